// Usage: charts by day, model, key and team (admins); a key's own usage and limits (keys).
import { api, barChart, content, csv, download, el, fmtNum, role, section, setStatus, table } from "./api.js";

const DAY = 86400;
const MAX_PAGES = 20;   // usage pages of up to 10,000 groups each, fetched one after another

// Every group of a usage report: the node answers a page at a time.
async function allGroups(query) {
  let rows = [];
  for (let i = 0; i < MAX_PAGES; i++) {
    const r = await api(`/admin/v1/usage?${query}&limit=10000&offset=${rows.length}`);
    rows = rows.concat(r.data);
    if (!r.has_more) break;
  }
  return rows;
}
const tokens = (r) => (r.prompt_tokens || 0) + (r.completion_tokens || 0);

async function staff(days) {
  const since = Math.floor(Date.now() / 1000 / DAY - days + 1) * DAY;
  const by = (g) => allGroups(`group_by=${g}&since=${since}`);
  const [byDay, byModel, byKey, byTeam] = await Promise.all([by("day"), by("model"), by("key"), by("team")]);
  const chart = (title, rows, label) => barChart(title, rows.map((r) => [label(r), tokens(r)]).sort((a, b) => b[1] - a[1]), " tok");
  const exportBtn = el("button", { type: "button", id: "export-csv" }, "Export CSV (by key and model)");
  exportBtn.addEventListener("click", async () => {
    const rows = await allGroups(`group_by=day,key,model&since=${since}`);
    const cols = rows.length ? Object.keys(rows[0]) : ["day", "key_id", "model", "requests", "prompt_tokens", "completion_tokens"];
    download(`usage-${days}d.csv`, csv(rows, cols));
  });
  const requestsLink = el("a", { href: `/ui/api/admin/v1/usage/requests?format=csv&since=${since}`, download: "requests.csv" },
    "Every request (CSV)");
  content().replaceChildren(
    section(`Tokens per day (last ${days} days)`,
      barChart("Tokens per day", byDay.map((r) => [r.day, tokens(r)]).sort(), " tok"),
      el("div", { class: "actions" }, exportBtn, requestsLink)),
    el("div", { class: "cols" },
      section("By model", chart("Tokens by model", byModel, (r) => r.model)),
      section("By team", chart("Tokens by team", byTeam, (r) => r.team || "(no team)"))),
    section("By key", chart("Tokens by key", byKey, (r) => r.key || "(none)"),
      table([["Key", (r) => r.key || "(none)"], ["Requests", (r) => fmtNum(r.requests)],
             ["Prompt", (r) => fmtNum(r.prompt_tokens)], ["Completion", (r) => fmtNum(r.completion_tokens)]],
            byKey.sort((a, b) => tokens(b) - tokens(a)).slice(0, 50))));
  setStatus(`Usage since ${new Date(since * 1000).toISOString().slice(0, 10)}`);
}

async function own() {
  const me = await api("/v1/me");
  const usage = (await api("/v1/me/usage")).data || [];
  // /v1/me gives each scope (the key, its team) with its limits and what remains of each.
  const ROWS = [["Requests/min", "rpm", "remaining_requests"], ["Tokens/min", "tpm", "remaining_tokens"],
                ["Parallel", "max_parallel", null], ["Token budget", "budget_tokens", "remaining_budget_tokens"],
                ["Money budget ($)", "budget_usd", "remaining_budget_usd"]];
  const limits = [];
  for (const [scope, v] of Object.entries(me.limits || {})) {
    for (const [label, limit, left] of ROWS) {
      if (v[limit] === null || v[limit] === undefined) continue;
      limits.push({ name: `${label} (${scope}${limit.startsWith("budget") ? `, per ${v.budget_period}` : ""})`,
                    limit: v[limit], remaining: left ? v[left] : v[limit] - (v.in_flight || 0) });
    }
  }
  content().replaceChildren(
    section("This key", el("dl", { class: "facts" },
      el("dt", {}, "Name"), el("dd", { id: "me-name" }, me.name),
      el("dt", {}, "Id"), el("dd", {}, el("code", {}, me.id)),
      el("dt", {}, "Team"), el("dd", {}, me.team || "–"),
      el("dt", {}, "Plan"), el("dd", {}, me.plan || "–"))),
    section("Limits", table([["Limit", (l) => l.name], ["Value", (l) => fmtNum(l.limit)],
                             ["Remaining", (l) => fmtNum(l.remaining)]], limits, { empty: "No limits: only the node's capacity." })),
    section("Usage by day", barChart("Tokens per day", usage.map((r) => [`${r.day} ${r.model || ""}`, tokens(r)]), " tok"),
      table([["Day", (r) => r.day], ["Model", (r) => r.model], ["Requests", (r) => fmtNum(r.requests)],
             ["Prompt", (r) => fmtNum(r.prompt_tokens)], ["Completion", (r) => fmtNum(r.completion_tokens)]], usage)));
  setStatus("Your key's usage");
}

(role === "key" ? own() : staff(30)).catch((e) => setStatus(e.message, true));
