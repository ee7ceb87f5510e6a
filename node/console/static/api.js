// Shared by every console page: the API forwarder, safe DOM building, tables and charts.
// Text always goes in with textContent (never innerHTML), so data cannot become markup.

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
export const csrf = meta("csrf-token");
export const role = meta("role");
export const can = {
  manage: role === "admin",                          // tokens, keys, teams, plans
  operate: role === "admin" || role === "operator",  // load, unload, restart, reload
};

export class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// Call the node through the console: /ui/api/admin/v1/... or /ui/api/v1/...
export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const h = { ...headers };
  if (method !== "GET") h["x-csrf-token"] = csrf;
  if (body !== undefined) h["content-type"] = "application/json";
  const r = await fetch("/ui/api" + path, {
    method, headers: h, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401 && path !== "/session") { location.assign("/ui/login"); }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!r.ok) {
    const e = data && data.error;
    const msg = (e && (e.message || (typeof e === "string" ? e : null))) || `${r.status} ${r.statusText}`;
    throw new ApiError(msg, r.status);
  }
  return data;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function setStatus(text, error = false) {
  // The first answer shown marks when the page became usable (read by the browser tests).
  if (!performance.getEntriesByName("console-ready").length) performance.mark("console-ready");
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = error ? "error" : "muted";
}

export function content() { return document.getElementById("content"); }

export function section(title, ...children) {
  return el("section", { class: "card" }, el("h2", {}, title), ...children);
}

// A table: columns are [title, row => cell] pairs; a cell may be text or a node.
export function table(columns, rows, { empty = "Nothing yet." } = {}) {
  if (!rows.length) return el("p", { class: "muted" }, empty);
  return el("div", { class: "scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, columns.map(([t]) => el("th", { scope: "col" }, t)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, columns.map(([, f]) => el("td", {}, f(r))))))));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

// A horizontal bar chart of [label, value] pairs (SVG, no library).
export function barChart(title, entries, unit = "") {
  const rows = entries.slice(0, 20);
  const max = Math.max(1, ...rows.map(([, v]) => v));
  const bar = 22, width = 640, labelW = 200;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${rows.length * bar + 4}`, role: "img", class: "chart",
                             "aria-label": title });
  rows.forEach(([label, v], i) => {
    const w = Math.max(1, ((width - labelW - 90) * v) / max);
    chart.append(svg("text", { x: 0, y: i * bar + 15, class: "label" }, String(label).slice(0, 28)));
    chart.append(svg("rect", { x: labelW, y: i * bar + 3, width: w, height: bar - 6, rx: 3 }));
    chart.append(svg("text", { x: labelW + w + 6, y: i * bar + 15, class: "value" }, fmtNum(v) + unit));
  });
  return el("figure", {}, el("figcaption", {}, title), chart);
}

export function fmtNum(n) {
  if (n === null || n === undefined) return "–";
  if (typeof n !== "number") return String(n);
  if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(2);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

export function fmtTime(ts) {
  if (!ts) return "–";
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

export function fmtAge(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

export function badge(state) {
  return el("span", { class: `badge state-${String(state).replace(/[^a-z_]/gi, "")}` }, state);
}

// A button that runs an async action, shows it is busy, and reports failure in the status line.
export function action(label, run, { danger = false, confirmText = null } = {}) {
  const b = el("button", { type: "button", class: danger ? "danger" : "" }, label);
  b.addEventListener("click", async () => {
    if (confirmText && !window.confirm(confirmText)) return;
    b.disabled = true;
    try { await run(); } catch (e) { setStatus(e.message, true); } finally { b.disabled = false; }
  });
  return b;
}

// Refresh a view now and every `ms` while the tab is visible.
export function every(ms, fn) {
  const tick = async () => {
    if (document.visibilityState === "visible") {
      try { await fn(); } catch (e) { setStatus(e.message, true); }
    }
  };
  tick();
  return setInterval(tick, ms);
}

export function download(name, text, type = "text/csv") {
  const a = el("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

export function csv(rows, columns) {
  const q = (v) => {
    let s = v === null || v === undefined ? "" : String(v);
    if (typeof v === "string" && /^[=+\-@\t\r]/.test(s)) s = "'" + s;  // no formulas in a spreadsheet
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  return [columns.join(","), ...rows.map((r) => columns.map((c) => q(r[c])).join(","))].join("\r\n") + "\r\n";
}
