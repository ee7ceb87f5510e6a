// Playground: stream a chat with a model the key may use; time to first token and tokens/s.
import { content, csrf, el, role, section, setStatus } from "./api.js";

const keyInput = role === "key" ? null
  : el("input", { type: "password", id: "pg-key", autocomplete: "off", spellcheck: "false", maxlength: 512,
                  placeholder: "sk-…", "aria-label": "API key to use" });
const modelSel = el("select", { id: "pg-model", "aria-label": "Model" });
const system = el("textarea", { id: "pg-system", rows: 2, placeholder: "System prompt (optional)", "aria-label": "System prompt" });
const prompt = el("textarea", { id: "pg-prompt", rows: 4, required: true, placeholder: "Say something…", "aria-label": "Message" });
const maxTokens = el("input", { id: "pg-max", type: "number", min: 1, max: 32768, value: 64, "aria-label": "Max tokens" });
const send = el("button", { type: "submit", id: "pg-send" }, "Send");
const stop = el("button", { type: "button", id: "pg-stop", disabled: true }, "Stop");
const output = el("pre", { id: "pg-output", class: "output", "aria-live": "polite" });
const stats = el("p", { id: "pg-stats", class: "muted" });
let controller = null;

function headers() {
  const h = { "content-type": "application/json", "x-csrf-token": csrf };
  if (keyInput) h["x-playground-key"] = keyInput.value.trim();
  return h;
}

async function loadModels() {
  if (keyInput && !keyInput.value.trim()) { setStatus("Paste an API key to use, then pick a model."); return; }
  const r = await fetch("/ui/api/v1/models", { headers: headers(), credentials: "same-origin" });
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error(data?.error?.message || `${r.status}`);
  modelSel.replaceChildren(...data.data.map((m) => el("option", { value: m.id }, m.id)));
  setStatus(`${data.data.length} models this key may use`);
}

async function run(ev) {
  ev.preventDefault();
  const messages = [];
  if (system.value.trim()) messages.push({ role: "system", content: system.value });
  messages.push({ role: "user", content: prompt.value });
  output.textContent = "";
  stats.textContent = "";
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  const t0 = performance.now();
  let first = null, usage = null, chunks = 0;
  try {
    const r = await fetch("/ui/api/v1/chat/completions", {
      method: "POST", headers: headers(), credentials: "same-origin", signal: controller.signal,
      body: JSON.stringify({ model: modelSel.value, messages, max_tokens: Number(maxTokens.value) || 64,
                             stream: true, stream_options: { include_usage: true } }),
    });
    if (!r.ok) {
      const data = await r.json().catch(() => null);
      throw new Error(data?.error?.message || `${r.status} ${r.statusText}`);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + (buf.slice(i, i + 4) === "\r\n\r\n" ? 4 : 2));
        for (const line of event.split(/\r\n|\n|\r/)) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") continue;
          const msg = JSON.parse(payload);
          if (msg.error) throw new Error(msg.error.message || "the stream failed");
          if (msg.usage) usage = msg.usage;
          const delta = msg.choices?.[0]?.delta?.content;
          if (delta) {
            if (first === null) first = performance.now();
            chunks += 1;
            output.append(delta);
          }
        }
      }
    }
    const end = performance.now();
    const n = usage?.completion_tokens ?? chunks;
    const ttft = first === null ? null : first - t0;
    const rate = first !== null && end > first ? (n / ((end - first) / 1000)) : null;
    stats.textContent = `time to first token ${ttft === null ? "–" : ttft.toFixed(0) + " ms"} · ` +
      `${n} tokens · ${rate === null ? "–" : rate.toFixed(1)} tokens/s`;
    stats.dataset.ttftMs = ttft === null ? "" : ttft.toFixed(1);
    stats.dataset.tokens = String(n);
    setStatus("Done");
  } catch (e) {
    if (e.name !== "AbortError") setStatus(e.message, true); else setStatus("Stopped");
  } finally {
    send.disabled = false; stop.disabled = true; controller = null;
  }
}

const form = el("form", { id: "pg-form", class: "playground" },
  keyInput ? el("label", {}, "API key", keyInput) : null,
  el("label", {}, "Model", modelSel),
  el("label", {}, "Max tokens", maxTokens),
  system, prompt,
  el("div", { class: "actions" }, send, stop));
form.addEventListener("submit", run);
stop.addEventListener("click", () => controller && controller.abort());
if (keyInput) keyInput.addEventListener("change", () => loadModels().catch((e) => setStatus(e.message, true)));
content().replaceChildren(section("Chat", form, output, stats));
loadModels().catch((e) => setStatus(e.message, true));
