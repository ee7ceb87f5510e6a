// Overview: the node, its models and replicas, who waits for them, GPUs and the last minute's traffic, live.
import { api, badge, content, el, every, fmtAge, fmtBytes, fmtNum, section, setStatus, table } from "./api.js";

function render(s) {
  const n = s.node;
  const t = s.traffic || {};
  const summary = el("dl", { class: "facts" },
    el("dt", {}, "State"), el("dd", {}, badge(n.ready ? "ready" : "not ready")),
    el("dt", {}, "Version"), el("dd", {}, n.version),
    el("dt", {}, "Uptime"), el("dd", {}, fmtAge(Date.now() / 1000 - n.uptime_s)),
    el("dt", {}, "Keys"), el("dd", {}, fmtNum(n.keys)),
    el("dt", {}, "Requests/s (1 min)"), el("dd", { id: "req-rate" }, (t.requests_per_s || 0).toFixed(2)),
    el("dt", {}, "Errors (1 min)"), el("dd", {}, fmtNum(t.errors || 0)),
    el("dt", {}, "Refused (1 min)"), el("dd", {}, fmtNum(t.rejected || 0)));
  const reasons = (n.reasons || []).length ? el("ul", { class: "reasons" }, n.reasons.map((r) => el("li", {}, r))) : null;
  const workers = table([
    ["Model", (w) => w.model],
    ["Replica", (w) => String(w.replica)],
    ["Runtime", (w) => w.runtime],
    ["State", (w) => badge(w.state)],
    ["Since", (w) => fmtAge(w.since)],
    ["Restarts", (w) => String(w.restarts)],
    ["In flight", (w) => String(w.inflight)],
    ["GPUs", (w) => (w.gpus || []).length ? w.gpus.join(", ") : "CPU"],
    ["Last error", (w) => el("span", { class: "small" }, w.last_error || "")],
  ], s.workers, { empty: "No replicas." });
  const g = s.gpus || {};
  const gpus = (g.data || []).length ? table([
    ["GPU", (x) => `${x.index} ${x.name}`],
    ["Memory", (x) => `${fmtBytes(x.memory_used)} / ${fmtBytes(x.memory_total)}`],
    ["Utilisation", (x) => x.utilization === null || x.utilization === undefined ? "–" : `${Math.round(x.utilization * 100)} %`],
    ["Temperature", (x) => x.temperature_c === null || x.temperature_c === undefined ? "–" : `${Math.round(x.temperature_c)} °C`],
    ["Power", (x) => x.power_w === null || x.power_w === undefined ? "–" : `${Math.round(x.power_w)} W`],
  ], g.data) : el("p", { class: "muted" }, g.error ? `No GPUs: ${g.error}` : "No GPUs: models run on the CPU.");
  const waiting = (s.queue || []).flatMap((m) => m.waiting.map((w) => ({ model: m.model, ...w })));
  const queue = table([
    ["Model", (w) => w.model],
    ["Tenant", (w) => w.tenant],
    ["Priority", (w) => w.priority],
    ["Waiting", (w) => fmtNum(w.waiting)],
    ["Keys", (w) => fmtNum(w.keys)],
    ["Oldest", (w) => `${w.oldest_s.toFixed(1)} s`],
  ], waiting, { empty: "Nothing waits: every request has a slot." });
  content().replaceChildren(
    section("Node", summary, reasons),
    section("Models and replicas", workers),
    section("Waiting tenants", queue),
    section("GPUs", gpus));
  setStatus(`Updated ${new Date().toLocaleTimeString()}`);
}

every(2000, async () => render(await api("/admin/v1/status")));
