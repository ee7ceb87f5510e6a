"""Ollama's API (`/api/chat`, `/api/generate`, `/api/embed`, listings) over the workers' OpenAI API.

Follows Ollama's docs/api.md and the official `ollama` Python client's types: requests
with `options` (num_predict, temperature, top_p, top_k, min_p, stop, seed,
presence/frequency penalties), `format`, `images`, `tools`, `keep_alive`, `stream`
(true unless false, as Ollama does); answers and NDJSON stream lines with `done`,
`done_reason`, `prompt_eval_count`, `eval_count` and durations in nanoseconds; errors
as `{"error": "..."}`.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from node.errors import InvalidRequest, ModelNotFound, NodeError
from node.gateway.adapter import Call, ModelView, Route, bearer, expect

VERSION = "0.12.0"  # the Ollama API version whose shapes the node speaks
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}
# Ollama option -> OpenAI field, and the JSON kinds it takes.
OPTIONS: dict[str, tuple[str, Any]] = {
    "num_predict": ("max_tokens", int), "temperature": ("temperature", (int, float)), "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", int), "min_p": ("min_p", (int, float)), "seed": ("seed", int),
    "presence_penalty": ("presence_penalty", (int, float)), "frequency_penalty": ("frequency_penalty", (int, float)),
}
IGNORED_CHECKED: dict[str, Any] = {"num_ctx": int, "repeat_penalty": (int, float), "repeat_last_n": int, "num_keep": int}
IMAGE_MAGIC = (("iVBOR", "image/png"), ("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))


def error(err: NodeError, rid: str) -> tuple[int, bytes]:
    """Ollama's error shape: {"error": "message"}."""
    return err.status, json.dumps({"error": err.message}).encode()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# -- requests ------------------------------------------------------------------
def _common(body: dict[str, Any], out: dict[str, Any]) -> None:
    expect(body, "model", str, required=True)
    out["stream"] = body.get("stream") is not False
    keep = body.get("keep_alive")
    if keep is not None and not isinstance(keep, (str, int, float)):
        raise InvalidRequest("'keep_alive' must be a duration string or a number of seconds", param="keep_alive")
    options = expect(body, "options", dict) or {}
    for name, (field, kind) in OPTIONS.items():
        value = expect(options, name, kind)
        if value is None:
            continue
        if name == "num_predict" and value < 0:  # -1: until done, -2: fill the context; the runtime's default
            continue
        out[field] = value
    stop = options.get("stop")
    if isinstance(stop, str):
        out["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        out["stop"] = stop
    elif stop is not None:
        raise InvalidRequest("'options.stop' must be a string or an array of strings", param="options.stop")
    for name, kind in IGNORED_CHECKED.items():
        expect(options, name, kind)
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidRequest("'format' must be \"json\" or a JSON schema object", param="format")


def _images(images: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise InvalidRequest(f"'{param}' must be an array of base64 strings", param=param)
    parts = []
    for data in images:
        media = next((m for prefix, m in IMAGE_MAGIC if data.startswith(prefix)), "image/png")
        parts.append({"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}})
    return parts


class _Pending:
    """Tool calls not yet answered: a result takes the oldest call of its tool's name, else the oldest call.

    Each call is queued once and skipped at most once when answered by the other route, so a
    chat with N calls and N results costs O(N) (a list searched per result was O(N²)).
    """

    __slots__ = ("order", "by_name", "answered", "seq")

    def __init__(self) -> None:
        self.order: deque[tuple[int, str]] = deque()             # (seq, call id), oldest first
        self.by_name: dict[Any, deque[tuple[int, str]]] = {}     # tool name -> its calls, oldest first
        self.answered: set[int] = set()
        self.seq = 0

    def add(self, call_id: str, name: str) -> None:
        entry = (self.seq, call_id)
        self.seq += 1
        self.order.append(entry)
        self.by_name.setdefault(name, deque()).append(entry)

    def answer(self, name: Any) -> str | None:
        """The call id a result for `name` answers, or None when no call waits."""
        queue = self.by_name.get(name) if isinstance(name, str) else None
        for q in (queue, self.order):
            while q:
                seq, call_id = q.popleft()
                if seq not in self.answered:
                    self.answered.add(seq)
                    return call_id
        return None


def chat_to_openai(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An /api/chat request as a chat completions request."""
    out: dict[str, Any] = {"model": body.get("model")}
    _common(body, out)
    raw = expect(body, "messages", list) or []
    messages: list[dict[str, Any]] = []
    pending = _Pending()
    for i, msg in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"{where}: a message is an object with role system, user, assistant or tool",
                                 param=where)
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string", param=where)
        role = msg["role"]
        if role == "tool":
            call_id = msg.get("tool_call_id") or pending.answer(msg.get("tool_name") or msg.get("name")) or f"call_{i}"
            messages.append({"role": "tool", "tool_call_id": call_id, "content": content or ""})
            continue
        turn: dict[str, Any] = {"role": role, "content": content or ""}
        if msg.get("images") and role == "user":
            turn["content"] = _images(msg["images"], f"{where}.images") + [{"type": "text", "text": content or ""}]
        if role == "assistant" and msg.get("tool_calls"):
            calls = msg["tool_calls"]
            if not isinstance(calls, list):
                raise InvalidRequest(f"{where}.tool_calls must be an array", param=where)
            turn["tool_calls"] = []
            for j, tc in enumerate(calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidRequest(f"{where}.tool_calls.{j}: a call needs function.name", param=where)
                call_id = tc.get("id") or f"call_{i}_{j}"
                args = fn.get("arguments")
                turn["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args or {})}})
                pending.add(call_id, fn["name"])
            turn["content"] = content or None
        messages.append(turn)
    out["messages"] = messages
    tools = expect(body, "tools", list)
    if tools:
        for j, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                raise InvalidRequest(f"tools.{j}: a tool is {{type: function, function: {{name, parameters}}}}",
                                     param=f"tools.{j}")
        out["tools"] = [{"type": "function", "function": t["function"]} for t in tools]
    return "chat", out


def generate_to_openai(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An /api/generate request: raw prompts (and fill-in-the-middle) as completions, others as chat."""
    out: dict[str, Any] = {"model": body.get("model")}
    _common(body, out)
    prompt = expect(body, "prompt", str) or ""
    system = expect(body, "system", str)
    suffix = expect(body, "suffix", str)
    if not prompt and not body.get("images"):
        out["max_tokens"], out["stream"] = 1, False  # Ollama's "load the model" call: models here are loaded
    if body.get("raw") is True or suffix:
        out["prompt"] = prompt
        if suffix:
            out["suffix"] = suffix
        return "completions", out
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    content: Any = prompt
    if body.get("images"):
        content = _images(body["images"], "images") + [{"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    out["messages"] = messages
    return "chat", out


def embed_to_openai(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An /api/embed (or legacy /api/embeddings) request as an embeddings request."""
    expect(body, "model", str, required=True)
    if "prompt" in body and "input" not in body:  # /api/embeddings
        inputs: Any = expect(body, "prompt", str, required=True)
    else:
        inputs = body.get("input")
        if not isinstance(inputs, str) and not (isinstance(inputs, list) and all(isinstance(s, str) for s in inputs)):
            raise InvalidRequest("'input' must be a string or an array of strings", param="input")
    out: dict[str, Any] = {"model": body["model"], "input": inputs}
    dims = expect(body, "dimensions", int)
    if dims is not None:
        out["dimensions"] = dims
    return "embeddings", out


# -- answers -------------------------------------------------------------------
def _tail(call: Call, reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    total = int((time.perf_counter() - call.started) * 1e9) if call.started else 0
    return {"done": True, "done_reason": DONE_REASONS.get(reason or "stop", "stop"), "total_duration": total,
            "load_duration": 0, "prompt_eval_count": int(usage.get("prompt_tokens") or 0), "prompt_eval_duration": 0,
            "eval_count": int(usage.get("completion_tokens") or 0), "eval_duration": total}


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for i, tc in enumerate(calls or ()):
        fn = tc.get("function") or {}
        args = fn.get("arguments")
        try:
            parsed = json.loads(args) if isinstance(args, str) and args else (args or {})
        except ValueError:
            parsed = {"arguments": args}
        out.append({"id": tc.get("id") or f"call_{i}", "function": {"index": i, "name": fn.get("name", ""),
                                                                   "arguments": parsed}})
    return out


def chat_from_openai(obj: dict[str, Any], call: Call) -> bytes:
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("tool_calls"):
        message["tool_calls"] = _tool_calls(msg["tool_calls"])
    return json.dumps({"model": call.model, "created_at": _iso(call.created), "message": message,
                       **_tail(call, choice.get("finish_reason"), obj.get("usage") or {})}).encode()


def generate_from_openai(obj: dict[str, Any], call: Call) -> bytes:
    choice = (obj.get("choices") or [{}])[0]
    if not call.req.get("prompt") and not call.req.get("images"):
        return json.dumps({"model": call.model, "created_at": _iso(call.created), "response": "", "done": True,
                           "done_reason": "load"}).encode()
    text = choice["text"] if "text" in choice else (choice.get("message") or {}).get("content") or ""
    return json.dumps({"model": call.model, "created_at": _iso(call.created), "response": text,
                       **_tail(call, choice.get("finish_reason"), obj.get("usage") or {})}).encode()


def embed_from_openai(obj: dict[str, Any], call: Call) -> bytes:
    vectors = [d.get("embedding") for d in sorted(obj.get("data") or (), key=lambda d: d.get("index", 0))]
    if "prompt" in call.req and "input" not in call.req:
        return json.dumps({"embedding": vectors[0] if vectors else []}).encode()
    tail = _tail(call, "stop", obj.get("usage") or {})
    return json.dumps({"model": call.model, "embeddings": vectors, "total_duration": tail["total_duration"],
                       "load_duration": 0, "prompt_eval_count": tail["prompt_eval_count"]}).encode()


class NdjsonStream:
    """OpenAI chunks in, Ollama NDJSON lines out (tool calls, which Ollama sends whole, at their end)."""

    __slots__ = ("call", "head", "chat", "reason", "calls")

    def __init__(self, call: Call, chat: bool) -> None:
        self.call, self.chat = call, chat
        created = json.dumps(_iso(call.created))
        self.head = (b'{"model": %s, "created_at": %s, ' % (json.dumps(call.model).encode(), created.encode()))
        self.reason: str | None = None
        self.calls: dict[int, dict[str, Any]] = {}

    def _line(self, text: str) -> bytes:
        if self.chat:
            return self.head + b'"message": {"role": "assistant", "content": %s}, "done": false}\n' % json.dumps(
                text).encode()
        return self.head + b'"response": %s, "done": false}\n' % json.dumps(text).encode()

    def feed(self, chunk: dict[str, Any]) -> bytes:
        choices = chunk.get("choices")
        if not choices:
            return b""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.reason = choice["finish_reason"]
        if "text" in choice:
            return self._line(choice["text"]) if choice["text"] else b""
        delta = choice.get("delta") or {}
        for tc in delta.get("tool_calls") or ():
            # Name and argument pieces kept as lists, joined once at the end (+= on a held string is quadratic).
            held = self.calls.setdefault(tc.get("index", 0), {"id": None, "name": [], "arguments": []})
            fn = tc.get("function") or {}
            held["id"] = held["id"] or tc.get("id")
            held["name"].append(fn.get("name") or "")
            held["arguments"].append(fn.get("arguments") or "")
        text = delta.get("content")
        return self._line(text) if text else b""

    def finish(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = b""
        if self.calls:
            calls = [{"id": c["id"], "function": {"name": "".join(c["name"]), "arguments": "".join(c["arguments"])}}
                     for c in (self.calls[k] for k in sorted(self.calls))]
            message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls)}
            out = json.dumps({"model": self.call.model, "created_at": _iso(self.call.created), "message": message,
                              "done": False}).encode() + b"\n"
        last: dict[str, Any] = {"model": self.call.model, "created_at": _iso(time.time())}
        if self.chat:
            last["message"] = {"role": "assistant", "content": ""}
        else:
            last["response"] = ""
        last.update(_tail(self.call, self.reason, {"prompt_tokens": prompt_tokens,
                                                   "completion_tokens": completion_tokens}))
        return out + json.dumps(last).encode() + b"\n"

    def fail(self, err: NodeError) -> bytes:
        return json.dumps({"error": err.message}).encode() + b"\n"


# -- listings (answered by the node) ----------------------------------------------
class ManagedByConfig(NodeError):
    """Models come and go through appliance.toml and models.lock, never through a client."""

    status = 403
    type = "permission_error"
    code = "models_managed_by_config"


def tagged(name: str) -> str:
    """The name as Ollama lists it: with its tag (`:latest` when it has none)."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _details(v: ModelView) -> dict[str, Any]:
    c = v.card
    family = c.family if c is not None else ""
    return {"parent_model": "", "format": v.format or "unknown", "family": family,
            "families": [family] if family else None, "parameter_size": c.parameter_size if c is not None else "",
            "quantization_level": c.quantization if c is not None else ""}


def _listed(v: ModelView) -> dict[str, Any]:
    name = tagged(v.name)
    return {"name": name, "model": name, "size": v.card.size if v.card is not None else 0,
            "digest": v.card.digest if v.card is not None else "", "details": _details(v)}


def version(models: list[ModelView], body: Any) -> bytes:
    return json.dumps({"version": VERSION}).encode()


def tags(models: list[ModelView], body: Any) -> bytes:
    return json.dumps({"models": [{**_listed(v), "modified_at": _iso(v.created)} for v in models]}).encode()


def ps(models: list[ModelView], body: Any) -> bytes:
    forever = "2318-01-01T00:00:00Z"  # loaded for as long as the node runs, as Ollama shows keep_alive=-1
    return json.dumps({"models": [{**_listed(v), "expires_at": forever, "size_vram": 0,
                                   "context_length": v.context_len or 0} for v in models if v.loaded]}).encode()


def capabilities(v: ModelView) -> list[str]:
    """What Ollama's /api/show says a model can do: from its kind and its chat template."""
    if v.card is not None and v.card.embedding:
        return ["embedding"]
    return ["completion", "tools"] if v.card is not None and v.card.tools else ["completion"]


def show(models: list[ModelView], body: Any) -> bytes:
    body = body or {}
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required", param="model")
    found = next((v for v in models if v.name in (name, name.removesuffix(":latest"))), None)
    if found is None:
        raise ModelNotFound(f"model '{name[:256]}' not found")
    arch = found.card.family if found.card is not None and found.card.family else "unknown"
    info: dict[str, Any] = {"general.architecture": arch}
    if found.context_len:
        info[f"{arch}.context_length"] = found.context_len
    return json.dumps({"modelfile": "", "parameters": "", "template": "", "details": _details(found),
                       "model_info": info, "capabilities": capabilities(found),
                       "modified_at": _iso(found.created)}).encode()


def managed(models: list[ModelView], body: Any) -> bytes:
    """/api/pull, /api/delete, /api/create, /api/copy, /api/push: refused, saying where models are managed."""
    raise ManagedByConfig("models on this node are managed in its appliance.toml: add the model there, then run "
                          "`infernode lock` and `infernode pull` (an admin's job); clients cannot pull, create, "
                          "copy, push or delete models")


def _route(**kw: Any) -> Route:
    return Route(api="ollama", error=error, credential=bearer, stream_type=b"application/x-ndjson", **kw)


ROUTES = {
    b"/api/chat": _route(to_openai=chat_to_openai, from_openai=chat_from_openai,
                         streamer=lambda call: NdjsonStream(call, chat=True)),
    b"/api/generate": _route(to_openai=generate_to_openai, from_openai=generate_from_openai,
                             streamer=lambda call: NdjsonStream(call, chat=False)),
    b"/api/embed": _route(to_openai=embed_to_openai, from_openai=embed_from_openai),
    b"/api/embeddings": _route(to_openai=embed_to_openai, from_openai=embed_from_openai),
    b"/api/version": _route(local=version, method="GET"),
    b"/api/tags": _route(local=tags, method="GET"),
    b"/api/ps": _route(local=ps, method="GET"),
    b"/api/show": _route(local=show),
    b"/api/pull": _route(local=managed),
    b"/api/push": _route(local=managed),
    b"/api/create": _route(local=managed),
    b"/api/copy": _route(local=managed),
    b"/api/delete": _route(local=managed, method="DELETE"),
}
