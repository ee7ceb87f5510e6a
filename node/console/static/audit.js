// Audit: every admin write, newest first, filterable by actor, action and time.
import { api, content, el, fmtTime, section, setStatus, table } from "./api.js";

const form = el("form", { id: "audit-filter", class: "inline-form" },
  el("label", {}, "Actor", el("input", { name: "actor", maxlength: 200 })),
  el("label", {}, "Action", el("input", { name: "action", maxlength: 200 })),
  el("label", {}, "Since", el("input", { name: "since", type: "date" })),
  el("button", { type: "submit" }, "Filter"));
const results = el("div", {});

async function load() {
  const d = Object.fromEntries(new FormData(form).entries());
  const q = new URLSearchParams();
  if (d.actor) q.set("actor", d.actor);
  if (d.action) q.set("action", d.action);
  if (d.since) q.set("since", String(Date.parse(d.since) / 1000));
  q.set("newest_first", "true");
  q.set("limit", "1000");
  const r = await api(`/admin/v1/audit?${q}`);
  const rows = r.data || [];
  results.replaceChildren(table([
    ["Time", (a) => fmtTime(a.ts ?? a.time)],
    ["Actor", (a) => `${a.actor ?? a.actor_id ?? ""}${a.role ? ` (${a.role})` : ""}`],
    ["From", (a) => a.source ?? a.source_address ?? ""],
    ["Action", (a) => el("code", {}, a.action)],
    ["Target", (a) => a.target ?? ""],
    ["Changes", (a) => el("code", { class: "small" }, a.changes ? JSON.stringify(a.changes) : "")],
  ], rows, { empty: "No records match." }));
  setStatus(`${rows.length} records`);
}

form.addEventListener("submit", (ev) => { ev.preventDefault(); load().catch((e) => setStatus(e.message, true)); });
content().replaceChildren(section("Audit log", form, results));
load().catch((e) => setStatus(e.message, true));
