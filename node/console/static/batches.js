// Batches: every batch (a team token: its team's) with its progress, live; operators cancel.
import { action, api, badge, can, content, el, every, fmtTime, section, setStatus, table } from "./api.js";

const results = el("div", {});

function progress(b) {
  const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = c.completed + c.failed;
  const bar = el("progress", { max: Math.max(c.total, 1), value: done, "aria-label": `${b.id} progress` });
  return el("span", {}, bar, ` ${done}/${c.total}${c.failed ? ` (${c.failed} failed)` : ""}`);
}

async function load() {
  const r = await api("/admin/v1/batches?limit=100");
  const rows = r.data || [];
  const columns = [
    ["Batch", (b) => el("code", {}, b.id)],
    ["Status", (b) => badge(b.status)],
    ["Progress", progress],
    ["Endpoint", (b) => b.endpoint],
    ["Created", (b) => fmtTime(b.created_at)],
    ["Expires", (b) => fmtTime(b.expires_at)],
  ];
  columns.splice(4, 0, ["Key", (b) => b.key_id || ""], ["Team", (b) => b.team || ""]);
  const cancellable = (b) => ["validating", "in_progress"].includes(b.status);
  if (can.operate) {
    columns.push(["", (b) => cancellable(b) ? action("Cancel", async () => {
      await api(`/admin/v1/batches/${encodeURIComponent(b.id)}/cancel`, { method: "POST" });
      await load();
    }, { danger: true, confirmText: `Cancel ${b.id}?` }) : ""]);
  }
  results.replaceChildren(table(columns, rows, { empty: "No batches yet." }));
  const running = rows.filter((b) => ["validating", "in_progress", "finalizing", "cancelling"].includes(b.status));
  setStatus(`${rows.length} batches, ${running.length} running`);
}

content().replaceChildren(section("Batches", results));
every(3000, load);
