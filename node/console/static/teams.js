// Teams and plans: the limits keys share, and the plans keys and teams take.
import { action, api, ApiError, can, content, el, fmtNum, section, setStatus, table } from "./api.js";

const LIMITS = ["rpm", "tpm", "max_parallel", "budget_tokens", "budget_usd"];

function limitsForm(id, submitLabel, onSubmit, extra = []) {
  const f = el("form", { id, class: "grid-form" },
    el("label", {}, "Name", el("input", { name: "name", required: true, maxlength: 200 })),
    ...extra,
    ...LIMITS.map((n) => el("label", {}, n, el("input", { name: n, type: "number", min: 0, step: n === "budget_usd" ? "0.01" : "1" }))),
    el("label", {}, "budget_period", el("select", { name: "budget_period" },
      el("option", { value: "day" }, "day"), el("option", { value: "month" }, "month"))),
    el("button", { type: "submit" }, submitLabel));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const d = Object.fromEntries(new FormData(f).entries());
    const body = { name: d.name, budget_period: d.budget_period };
    for (const n of LIMITS) if (d[n] !== "" && d[n] !== undefined) body[n] = Number(d[n]);
    for (const [k, v] of Object.entries(d)) if (!(k in body) && !LIMITS.includes(k) && v !== "") body[k] = v;
    try { await onSubmit(body); f.reset(); await load(); } catch (e) { setStatus(e.message, true); }
  });
  return f;
}

const limitCols = [
  ["rpm", (r) => fmtNum(r.rpm)], ["tpm", (r) => fmtNum(r.tpm)], ["Parallel", (r) => fmtNum(r.max_parallel)],
  ["Budget", (r) => [r.budget_tokens ? `${fmtNum(r.budget_tokens)} tokens` : null,
                     r.budget_usd ? `$${r.budget_usd}` : null].filter(Boolean).join(" + ") || "–"],
  ["Period", (r) => r.budget_period || "–"],
];

async function load() {
  const teams = (await api("/admin/v1/teams?limit=1000")).data;
  let plans = null, plansNote = null;
  try { plans = (await api("/admin/v1/plans?limit=1000")).data; }
  catch (e) { if (!(e instanceof ApiError && e.status === 404)) throw e; plansNote = "Plans are not available on this node."; }
  const teamTable = table([["Team", (t) => t.name], ["Plan", (t) => t.plan || "–"], ...limitCols,
    ["", (t) => can.manage ? action("Delete", async () => {
      await api(`/admin/v1/teams/${encodeURIComponent(t.name)}`, { method: "DELETE" }); await load();
    }, { danger: true, confirmText: `Delete team ${t.name}'s limits?` }) : ""]], teams, { empty: "No teams." });
  const planTable = plans ? table([["Plan", (p) => p.name],
    ["Models", (p) => (p.models && p.models.length ? p.models.join(", ") : "all")], ...limitCols,
    ["", (p) => can.manage && p.source !== "config" ? action("Delete", async () => {
      await api(`/admin/v1/plans/${encodeURIComponent(p.name)}`, { method: "DELETE" }); await load();
    }, { danger: true, confirmText: `Delete plan ${p.name}?` }) : (p.source === "config" ? "appliance.toml" : "")]],
    plans, { empty: "No plans." }) : el("p", { class: "muted" }, plansNote);
  content().replaceChildren(
    section("Teams", teamTable,
      can.manage ? el("details", {}, el("summary", {}, "New team"),
        limitsForm("create-team", "Create team", (b) => api("/admin/v1/teams", { method: "POST", body: b }),
          [el("label", {}, "Plan", el("input", { name: "plan", maxlength: 200 }))])) : null),
    section("Plans", planTable,
      can.manage && plans ? el("details", {}, el("summary", {}, "New plan"),
        limitsForm("create-plan", "Create plan", (b) => {
          if (b.models) b.models = b.models.split(",").map((s) => s.trim()).filter(Boolean);
          return api("/admin/v1/plans", { method: "POST", body: b });
        }, [el("label", {}, "Models (names or group:NAME, comma-separated)", el("input", { name: "models" }))])) : null));
  setStatus(`${teams.length} teams${plans ? `, ${plans.length} plans` : ""}`);
}

load().catch((e) => setStatus(e.message, true));
