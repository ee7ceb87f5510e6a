// Keys: create (the secret is shown once), revoke, rotate and edit limits; searchable list.
import { action, api, can, content, el, fmtAge, fmtNum, section, setStatus, table } from "./api.js";

const PAGE = 50;
let keys = [];
let total = 0;
let query = "";
let secretBox = null;   // the one place a new secret appears, until the page is left
const search = el("input", { type: "search", placeholder: "Search name, id, team", id: "key-search",
                             "aria-label": "Search keys" });
let typing = null;
search.addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { query = search.value; load().catch((e) => setStatus(e.message, true)); }, 200);
});
const listBox = el("div", {});

const num = (v) => (v === "" || v === null || v === undefined ? undefined : Number(v));

function secretPanel(title, record) {
  const input = el("input", { type: "text", readonly: true, value: record.key, id: "new-secret", class: "secret",
                              "aria-label": "The new secret" });
  const copy = el("button", { type: "button", id: "copy-secret" }, "Copy");
  copy.addEventListener("click", async () => {
    input.select();
    try { await navigator.clipboard.writeText(record.key); copy.textContent = "Copied"; }
    catch { document.execCommand && document.execCommand("copy"); copy.textContent = "Copied"; }
  });
  return el("div", { class: "secret-panel", role: "alert" },
    el("strong", {}, title),
    el("p", {}, "This is the only time the secret is shown. Copy it now; the node keeps only its hash."),
    el("div", { class: "row" }, input, copy));
}

function createForm() {
  const f = el("form", { id: "create-key", class: "grid-form" },
    el("label", {}, "Name", el("input", { name: "name", required: true, maxlength: 200 })),
    el("label", {}, "Team", el("input", { name: "team", maxlength: 200 })),
    el("label", {}, "Plan", el("input", { name: "plan", maxlength: 200 })),
    el("label", {}, "Models (comma-separated; empty = all)", el("input", { name: "models" })),
    el("label", {}, "Requests/min", el("input", { name: "rpm", type: "number", min: 1 })),
    el("label", {}, "Tokens/min", el("input", { name: "tpm", type: "number", min: 1 })),
    el("label", {}, "Parallel", el("input", { name: "max_parallel", type: "number", min: 1 })),
    el("label", {}, "Token budget", el("input", { name: "budget_tokens", type: "number", min: 1 })),
    el("button", { type: "submit" }, "Create key"));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const d = Object.fromEntries(new FormData(f).entries());
    const body = { name: d.name };
    if (d.team) body.team = d.team;
    if (d.plan) body.plan = d.plan;
    if (d.models) body.models = d.models.split(",").map((s) => s.trim()).filter(Boolean);
    for (const k of ["rpm", "tpm", "max_parallel", "budget_tokens"]) if (num(d[k]) !== undefined) body[k] = num(d[k]);
    try {
      const rec = await api("/admin/v1/keys", { method: "POST", body });
      secretBox = secretPanel(`Key “${rec.name}” created (${rec.id})`, rec);
      f.reset();
      layout();
      await load();
    } catch (e) { setStatus(e.message, true); }
  });
  return f;
}

function editForm(k) {
  const f = el("form", { class: "inline-form" },
    el("label", {}, "rpm", el("input", { name: "rpm", type: "number", min: 1, value: k.rpm ?? "" })),
    el("label", {}, "tpm", el("input", { name: "tpm", type: "number", min: 1, value: k.tpm ?? "" })),
    el("label", {}, "parallel", el("input", { name: "max_parallel", type: "number", min: 1, value: k.max_parallel ?? "" })),
    el("label", {}, "plan", el("input", { name: "plan", maxlength: 200, value: k.plan ?? "" })),
    el("button", { type: "submit" }, "Save"));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const d = Object.fromEntries(new FormData(f).entries());
    const body = {};
    for (const n of ["rpm", "tpm", "max_parallel"]) body[n] = d[n] === "" ? null : Number(d[n]);
    if ((k.plan ?? "") !== d.plan) body.plan = d.plan === "" ? null : d.plan;
    try {
      await api(`/admin/v1/keys/${encodeURIComponent(k.id)}`, { method: "PATCH", body });
      setStatus(`Saved ${k.name}`);
      await load();
    } catch (e) { setStatus(e.message, true); }
  });
  return f;
}

function row_actions(k) {
  if (!can.manage || k.revoked) return k.revoked ? "revoked" : "";
  return el("div", { class: "actions" },
    action("Rotate", async () => {
      const rec = await api(`/admin/v1/keys/${encodeURIComponent(k.id)}/rotate`, { method: "POST", body: {} });
      secretBox = secretPanel(`Key “${k.name}” rotated`, rec);
      layout();
      await load();
    }, { confirmText: `Rotate ${k.name}? Its current secret stops working.` }),
    action("Revoke", async () => {
      await api(`/admin/v1/keys/${encodeURIComponent(k.id)}/revoke`, { method: "POST" });
      await load();
    }, { danger: true, confirmText: `Revoke ${k.name}? This cannot be undone.` }),
    el("details", {}, el("summary", {}, "Limits"), editForm(k)));
}

function render() {
  const list = table([
    ["Name", (k) => k.name],
    ["Id", (k) => el("code", {}, k.id)],
    ["Prefix", (k) => el("code", {}, k.prefix || "")],
    ["Team", (k) => k.team || "–"],
    ["Plan", (k) => k.plan || "–"],
    ["Models", (k) => (k.models ? k.models.join(", ") : "all")],
    ["rpm / tpm", (k) => `${fmtNum(k.rpm)} / ${fmtNum(k.tpm)}`],
    ["Created", (k) => fmtAge(k.created_at)],
    ["", (k) => row_actions(k)],
  ], keys, { empty: "No keys match." });
  const more = total > keys.length
    ? action(`Show more (${total - keys.length} left)`, async () => { await load(true); }) : null;
  listBox.replaceChildren(el("p", { class: "muted" }, `${total} keys${query ? " match" : ""}`), list, more || "");
}

let form = null;
let laidOut = false;
function layout() {
  laidOut = true;
  form = form || (can.manage ? createForm() : null);
  content().replaceChildren(
    can.manage ? section("New key", form, secretBox) : "",
    section("Keys", search, listBox));
}

async function load(more = false) {
  // One page at a time from the node, newest first: a box may hold tens of thousands of keys.
  const q = new URLSearchParams({ limit: String(PAGE), offset: String(more ? keys.length : 0), newest_first: "true" });
  if (query) q.set("q", query);
  const r = await api(`/admin/v1/keys?${q}`);
  keys = more ? keys.concat(r.data) : r.data;
  total = r.total;
  if (!laidOut) layout();
  render();
  setStatus(`${total} keys${query ? ` match “${query}”` : ""}`);
}

load().catch((e) => setStatus(e.message, true));
