// Models: each model's replicas and states; load, unload and restart (operators); recent log lines.
import { action, api, badge, can, content, el, every, fmtAge, section, setStatus, table } from "./api.js";

const logs = new Map();   // replica id -> last lines shown (kept across refreshes)

async function showLog(id) {
  const r = await api(`/admin/v1/workers/${encodeURIComponent(id)}/logs?lines=40`);
  logs.set(id, r.lines);
  await refresh();
}

function controls(model, onDemand) {
  if (!can.operate) return null;
  const post = (verb) => async () => {
    await api(`/admin/v1/models/${encodeURIComponent(model)}/${verb}`, { method: "POST" });
    setStatus(`${model}: ${verb} requested`);
    await refresh();
  };
  return el("div", { class: "actions" },
    onDemand ? action("Load", post("load")) : null,
    onDemand ? action("Unload", post("unload"), { confirmText: `Unload ${model}? Its next request waits for a load.` }) : null,
    action("Restart", post("restart"), { confirmText: `Restart every replica of ${model}?` }));
}

async function refresh() {
  const s = await api("/admin/v1/status");
  const byModel = new Map();
  const load = new Map((s.models || []).map((m) => [m.name, m.load]));
  for (const m of s.models || []) byModel.set(m.name, []);
  for (const w of s.workers) {
    if (!byModel.has(w.model)) byModel.set(w.model, []);
    byModel.get(w.model).push(w);
  }
  const cards = [...byModel.entries()].map(([model, replicas]) => section(model,
    el("p", { class: "muted small" }, load.get(model) === "on_demand" ? "Loaded on demand" : "Always loaded"),
    controls(model, load.get(model) === "on_demand"),
    table([
      ["Replica", (w) => w.id],
      ["Runtime", (w) => w.runtime],
      ["State", (w) => badge(w.state)],
      ["Since", (w) => fmtAge(w.since)],
      ["Restarts", (w) => String(w.restarts)],
      ["In flight", (w) => String(w.inflight)],
      ["", (w) => (w.sleeping ? "asleep" : "")],
      ["Log", (w) => action("Recent lines", () => showLog(w.id))],
    ], replicas, { empty: "No replica running (unloaded)." }),
    replicas.filter((w) => logs.has(w.id)).map((w) =>
      el("details", { open: true }, el("summary", {}, `${w.id}: last lines`),
         el("pre", { class: "log" }, logs.get(w.id).join("\n") || "(empty)")))));
  content().replaceChildren(...cards);
  setStatus(`Updated ${new Date().toLocaleTimeString()}`);
}

every(3000, refresh);
