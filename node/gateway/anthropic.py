"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over OpenAI chat completions.

Follows Anthropic's API reference ("Messages", "Streaming Messages", "Errors"): system
as a string or text blocks, text/image/tool_use/tool_result blocks, stop_sequences,
sampling fields, tools and tool_choice; answers as a `message` with text and tool_use
blocks, usage as input_tokens/output_tokens; streams as message_start, ping,
content_block_start/delta/stop, message_delta (stop_reason, usage), message_stop.
"""

from __future__ import annotations

import json
from typing import Any

from node.errors import InvalidRequest, NodeError
from node.gateway.adapter import Call, Route, bearer, expect

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
ROLES = ("user", "assistant")


def credential(req: Any) -> bytes | None:
    """Anthropic's clients send `x-api-key`; others a bearer token."""
    key = req.header(b"x-api-key")
    return key.strip() if key else bearer(req)


def error(err: NodeError, rid: str) -> tuple[int, bytes]:
    """Anthropic's error shape: {"type": "error", "error": {"type", "message"}, "request_id"}."""
    kind = ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return err.status, json.dumps({"type": "error", "error": {"type": kind, "message": err.message},
                                   "request_id": rid}).encode()


# -- request -------------------------------------------------------------------
def to_openai(body: dict[str, Any], *, counting: bool = False) -> tuple[str, dict[str, Any]]:
    """A Messages request as a chat completions request."""
    model = expect(body, "model", str, required=True)
    max_tokens = expect(body, "max_tokens", int, required=not counting)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest("'max_tokens' must be at least 1", param="max_tokens")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    raw = expect(body, "messages", list, required=True)
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise InvalidRequest(f"messages.{i}: a message is an object with role 'user' or 'assistant'",
                                 param=f"messages.{i}")
        messages += _message(msg, f"messages.{i}")
    out: dict[str, Any] = {"model": model, "messages": messages}
    if counting:
        out["max_tokens"] = 1
    else:
        out["max_tokens"] = max_tokens
        if body.get("stream") is True:
            out["stream"] = True
    for name, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", int)):
        value = expect(body, name, kind)
        if value is not None and not counting:
            out[name] = value
    stops = expect(body, "stop_sequences", list)
    if stops:
        if not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("'stop_sequences' must be an array of strings", param="stop_sequences")
        out["stop"] = stops
    metadata = expect(body, "metadata", dict)
    if metadata and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    tools = expect(body, "tools", list)
    if tools:
        out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = expect(body, "tool_choice", dict)
    if choice is not None:
        _tool_choice(choice, out)
    return "chat", out


def _text_of(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for block in value:
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise InvalidRequest(f"'{param}' takes text blocks only", param=param)
            parts.append(block["text"])
        return "\n".join(parts)
    raise InvalidRequest(f"'{param}' must be a string or an array of text blocks", param=param)


def _message(msg: dict[str, Any], param: str) -> list[dict[str, Any]]:
    role, content = msg["role"], msg.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{param}.content must be a string or an array of content blocks", param=param)
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{param}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidRequest(f"{where}: a tool_use block needs an id and a name", param=where)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidRequest(f"{where}: a tool_result block needs a tool_use_id", param=where)
            text = _result_text(block.get("content"), where)
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # the model's own earlier reasoning: chat completions has no place for it
        else:
            raise InvalidRequest(f"{where}: content blocks of type {kind!r} are not supported in a {role} message",
                                 param=where)
    out: list[dict[str, Any]] = results  # tool results answer the assistant turn just before
    if role == "assistant":
        text = "".join(p["text"] for p in parts)
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            turn["tool_calls"] = calls
        if text or calls:
            out.append(turn)
    elif parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _image_url(block: dict[str, Any], where: str) -> str:
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "base64" and isinstance(src.get("data"), str) \
            and isinstance(src.get("media_type"), str):
        return f"data:{src['media_type']};base64,{src['data']}"
    if isinstance(src, dict) and src.get("type") == "url" and isinstance(src.get("url"), str):
        return src["url"]
    raise InvalidRequest(f"{where}: an image block needs a base64 or url source", param=where)


def _result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            else:
                raise InvalidRequest(f"{where}: tool results take text content only here", param=where)
        return "\n".join(texts)
    raise InvalidRequest(f"{where}: a tool_result's content must be a string or text blocks", param=where)


def _tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools.{i}"
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise InvalidRequest(f"{where}: a tool is an object with a name", param=where)
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequest(f"{where}: server tools ({tool.get('type')}) are not available on this node; "
                             "define client tools with name, description and input_schema", param=where)
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}: 'input_schema' must be a JSON schema object", param=where)
    fn: dict[str, Any] = {"name": tool["name"], "parameters": schema}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _tool_choice(choice: dict[str, Any], out: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise InvalidRequest("'tool_choice' must be {type: auto|any|none} or {type: tool, name}", param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


# -- answer --------------------------------------------------------------------
def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"input_tokens": prompt, "output_tokens": completion, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def from_openai(obj: dict[str, Any], call: Call) -> bytes:
    """A chat completion as a Messages answer."""
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for i, tc in enumerate(msg.get("tool_calls") or ()):
        fn = tc.get("function") or {}
        content.append({"type": "tool_use", "id": tc.get("id") or f"toolu_{call.rid}_{i}", "name": fn.get("name", ""),
                        "input": _arguments(fn.get("arguments"))})
    stop_reason, stop_sequence = _stop(choice, call.req)
    u = obj.get("usage") or {}
    return json.dumps({
        "id": f"msg_{call.rid}", "type": "message", "role": "assistant", "model": call.model, "content": content,
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)),
    }).encode()


def count_from_openai(obj: dict[str, Any], call: Call) -> bytes:
    """count_tokens' answer: the prompt's tokens as the runtime counted them."""
    return json.dumps({"input_tokens": int((obj.get("usage") or {}).get("prompt_tokens") or 0)}).encode()


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) and raw else {}
    except ValueError:
        return {"arguments": raw}  # the model wrote invalid JSON: hand it over rather than drop it
    return value if isinstance(value, dict) else {"value": value}


def _stop(choice: dict[str, Any], req: dict[str, Any]) -> tuple[str | None, str | None]:
    reason = choice.get("finish_reason")
    matched = choice.get("stop_reason")  # vLLM names the stop string that ended the answer
    if reason == "stop" and isinstance(matched, str) and matched in (req.get("stop_sequences") or ()):
        return "stop_sequence", matched
    return STOP_REASONS.get(reason, "end_turn") if reason else None, None


# -- stream --------------------------------------------------------------------
def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"


_TEXT_DELTA = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": %d, "delta": {"type": "text_delta", "text": %s}}\n\n'
_JSON_DELTA = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": %d, "delta": {"type": "input_json_delta", "partial_json": %s}}\n\n'
_STOP = b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": %d}\n\n'
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


class MessageStream:
    """Chat completion chunks in, Anthropic stream events out."""

    __slots__ = ("call", "started", "open", "kind", "index", "tools", "reason", "matched")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.started = False
        self.open = -1          # the index of the open content block, -1 when none
        self.kind = ""          # "text" or "tool_use"
        self.index = 0          # the next block's index
        self.tools: dict[int, int] = {}  # upstream tool call index -> block index
        self.reason: str | None = None
        self.matched: str | None = None

    def _start(self) -> bytes:
        self.started = True
        return _event(b"message_start", {"type": "message_start", "message": {
            "id": f"msg_{self.call.rid}", "type": "message", "role": "assistant", "model": self.call.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(0, 0)}}) + PING

    def _close(self) -> bytes:
        if self.open < 0:
            return b""
        out = _STOP % self.open
        self.open = -1
        return out

    def _block(self, block: dict[str, Any], kind: str) -> bytes:
        out = self._close()
        self.open, self.kind = self.index, kind
        self.index += 1
        return out + _event(b"content_block_start", {"type": "content_block_start", "index": self.open,
                                                      "content_block": block})

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self.started else self._start()
        choices = chunk.get("choices")
        if not choices:
            return out
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text:
            if self.kind != "text" or self.open < 0:
                out += self._block({"type": "text", "text": ""}, "text")
            out += _TEXT_DELTA % (self.open, json.dumps(text).encode())
        parts = [out]  # one join: a chunk may carry many tool calls
        for tc in delta.get("tool_calls") or ():
            at = tc.get("index", 0)
            fn = tc.get("function") or {}
            if at not in self.tools:
                self.tools[at] = self.index
                parts.append(self._block({"type": "tool_use", "id": tc.get("id") or f"toolu_{self.call.rid}_{at}",
                                          "name": fn.get("name") or "", "input": {}}, "tool_use"))
            args = fn.get("arguments")
            if args and self.tools[at] == self.open:
                parts.append(_JSON_DELTA % (self.open, json.dumps(args).encode()))
        if choice.get("finish_reason"):
            self.reason, self.matched = _stop(choice, self.call.req)
        return b"".join(parts) if len(parts) > 1 else out

    def finish(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = (b"" if self.started else self._start()) + self._close()
        return out + _event(b"message_delta", {
            "type": "message_delta", "delta": {"stop_reason": self.reason or "end_turn", "stop_sequence": self.matched},
            "usage": usage(prompt_tokens, completion_tokens)}) + b'event: message_stop\ndata: {"type": "message_stop"}\n\n'

    def fail(self, err: NodeError) -> bytes:
        _, body = error(err, self.call.rid)
        return b"event: error\ndata: " + body + b"\n\n"


MESSAGES = Route(api="anthropic", error=error, credential=credential, to_openai=to_openai, from_openai=from_openai,
                 streamer=MessageStream, native="anthropic", native_path="/messages")
COUNT_TOKENS = Route(api="anthropic", error=error, credential=credential,
                     to_openai=lambda body: to_openai(body, counting=True), from_openai=count_from_openai,
                     prompt_only=True)
ROUTES = {b"/v1/messages": MESSAGES, b"/v1/messages/count_tokens": COUNT_TOKENS}
