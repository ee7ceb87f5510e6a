"""OpenAI's Responses API (`POST /v1/responses`), stateless, over chat completions.

Follows OpenAI's API reference ("Responses": create, the Response object, streaming
events): `input` as text or items (messages with input_text/input_image/output_text
parts, function_call, function_call_output), `instructions`, function tools,
`tool_choice`, `max_output_tokens`, `temperature`, `top_p`, `text.format`; answers
with `message` and `function_call` output items and usage as input/output tokens;
streams as response.created, response.in_progress, output_item/content_part
added/done, output_text delta/done, function_call_arguments delta/done and
response.completed (or response.incomplete), each with its sequence_number. What
needs stored state or OpenAI's own tools is a 400 saying so. Runtimes that serve the
Responses API themselves (the runtime adapter says so) get the request untranslated.
"""

from __future__ import annotations

import json
from typing import Any

from node.errors import InvalidRequest, NodeError
from node.gateway.adapter import Call, Route, bearer, expect

STATELESS = "this node's Responses API is stateless (store: false): send the whole conversation as input items"
UNSTATEFUL = {"previous_response_id": "previous_response_id needs stored responses",
              "conversation": "conversations need stored state", "background": "background responses need storage",
              "prompt": "prompt templates live on OpenAI's platform"}


def error(err: NodeError, rid: str) -> tuple[int, bytes]:
    """OpenAI's error shape, as on every /v1 route."""
    return err.status, err.body()


# -- request -------------------------------------------------------------------
def to_openai(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A Responses request as a chat completions request."""
    model = expect(body, "model", str, required=True)
    for name, why in UNSTATEFUL.items():
        if body.get(name) not in (None, False):
            raise InvalidRequest(f"{why}; {STATELESS}", param=name, code="unsupported_parameter")
    if body.get("store") is True:
        raise InvalidRequest(f"store: true is not available; {STATELESS}", param="store", code="unsupported_parameter")
    messages: list[dict[str, Any]] = []
    instructions = expect(body, "instructions", str)
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for i, item in enumerate(items):
            _item(item, f"input.{i}", messages)
    else:
        raise InvalidRequest("'input' must be a string or an array of input items", param="input")
    out: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("stream") is True:
        out["stream"] = True
    limit = expect(body, "max_output_tokens", int)
    if limit is not None:
        if limit < 1:
            raise InvalidRequest("'max_output_tokens' must be at least 1", param="max_output_tokens")
        out["max_tokens"] = limit
    for name in ("temperature", "top_p"):
        value = expect(body, name, (int, float))
        if value is not None:
            out[name] = value
    if expect(body, "parallel_tool_calls", bool) is False:
        out["parallel_tool_calls"] = False
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str):
        out["user"] = user
    tools = expect(body, "tools", list)
    if tools:
        out["tools"] = [_tool(t, f"tools.{i}") for i, t in enumerate(tools)]
    _tool_choice(body.get("tool_choice"), out)
    _format(body.get("text"), out)
    return "chat", out


def _item(item: Any, where: str, messages: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: an input item is an object", param=where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequest(f"{where}: role must be user, system, developer or assistant", param=where)
        content = _content(item.get("content"), where)
        if role == "assistant" and not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content)
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    elif kind == "function_call":
        for f in ("call_id", "name", "arguments"):
            if not isinstance(item.get(f), str):
                raise InvalidRequest(f"{where}: a function_call item needs {f} as a string", param=where)
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)  # parallel calls: one assistant turn
        elif last is not None and last["role"] == "assistant" and "tool_calls" not in last:
            last["tool_calls"] = [call]
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str):
            raise InvalidRequest(f"{where}: a function_call_output item needs a call_id", param=where)
        if isinstance(output, list):
            output = "".join(p.get("text", "") for p in _content(output, where) if isinstance(p, dict))
        if not isinstance(output, str):
            raise InvalidRequest(f"{where}: 'output' must be a string", param=where)
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
    elif kind == "reasoning":
        return  # the model's earlier reasoning: chat completions has no place for it
    elif kind == "item_reference":
        raise InvalidRequest(f"{where}: item references need stored items; {STATELESS}", param=where,
                             code="unsupported_parameter")
    else:
        raise InvalidRequest(f"{where}: input items of type {kind!r} are not supported on this node", param=where)


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: content must be a string or an array of parts", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise InvalidRequest(f"{where}.content.{j}: parts of type {kind!r} are not supported on this node "
                                 "(files and file ids need OpenAI's storage)", param=f"{where}.content.{j}")
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise InvalidRequest(f"{where}: only function tools are available on this node, not {kind!r}", param=where)
    if not isinstance(tool.get("name"), str):
        raise InvalidRequest(f"{where}: a function tool needs a name", param=where)
    fn = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    for f in ("description", "strict"):
        if tool.get(f) is not None:
            fn[f] = tool[f]
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if choice is None:
        return
    if choice in ("auto", "none", "required"):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise InvalidRequest("'tool_choice' must be auto, none, required or {type: function, name}",
                             param="tool_choice")


def _format(text: Any, out: dict[str, Any]) -> None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None or fmt.get("type") == "text":
        return
    if fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name") or "output", "schema": fmt["schema"], "strict": bool(fmt.get("strict"))}}
    else:
        raise InvalidRequest("'text.format' must be text, json_object or json_schema with a schema", param="text")


# -- answer --------------------------------------------------------------------
def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def envelope(call: Call, status: str, output: list[dict[str, Any]], use: dict[str, Any] | None) -> dict[str, Any]:
    """The Response object around its output."""
    req = call.req
    return {
        "id": f"resp_{call.rid}", "object": "response", "created_at": call.created, "status": status,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
        "model": call.model, "output": output, "parallel_tool_calls": req.get("parallel_tool_calls") is not False,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
        "temperature": req.get("temperature", 1.0), "text": req.get("text") or {"format": {"type": "text"}},
        "tool_choice": req.get("tool_choice") or "auto", "tools": req.get("tools") or [],
        "top_p": req.get("top_p", 1.0), "truncation": "disabled", "usage": use, "user": req.get("user"),
        "metadata": req.get("metadata") or {},
    }


def _message(call: Call, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{call.rid}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _function_call(call: Call, i: int, call_id: str, name: str, args: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call.rid}_{i}", "call_id": call_id, "name": name,
            "arguments": args, "status": status}


def from_openai(obj: dict[str, Any], call: Call) -> bytes:
    """A chat completion as a Response."""
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    output = []
    if msg.get("content"):
        output.append(_message(call, msg["content"]))
    for i, tc in enumerate(msg.get("tool_calls") or ()):
        fn = tc.get("function") or {}
        output.append(_function_call(call, i, tc.get("id") or f"call_{i}", fn.get("name", ""),
                                     fn.get("arguments") or "{}"))
    u = obj.get("usage") or {}
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    return json.dumps(envelope(call, status, output,
                               usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)))).encode()


# -- stream --------------------------------------------------------------------
_DELTA = (b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "item_id": %s, '
          b'"output_index": %d, "content_index": 0, "delta": %s, "logprobs": [], "sequence_number": %d}\n\n')
_ARGS = (b'event: response.function_call_arguments.delta\ndata: {"type": "response.function_call_arguments.delta", '
         b'"item_id": %s, "output_index": %d, "delta": %s, "sequence_number": %d}\n\n')


class ResponseStream:
    """Chat completion chunks in, Responses stream events out.

    The text and arguments are kept as they pass: the protocol's `.done` events and
    `response.completed` repeat them whole.
    """

    __slots__ = ("call", "seq", "started", "output", "items", "text", "text_at", "msg_id", "calls", "reason")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []   # finished items, in output order
        self.items = 0                           # output items begun so far
        self.text: list[str] | None = None      # the open message's text, None when no message is open
        self.text_at = -1
        self.msg_id = json.dumps(f"msg_{call.rid}").encode()
        self.calls: dict[int, dict[str, Any]] = {}  # upstream tool index -> open function_call state
        self.reason: str | None = None

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload = {"type": kind, **payload, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"

    def _start(self) -> bytes:
        self.started = True
        shell = envelope(self.call, "in_progress", [], None)
        return self._event("response.created", {"response": shell}) + \
            self._event("response.in_progress", {"response": shell})

    def _close_text(self) -> bytes:
        if self.text is None:
            return b""
        text, at = "".join(self.text), self.text_at
        self.text = None
        part = {"type": "output_text", "text": text, "annotations": []}
        item = _message(self.call, text)
        self.output.append(item)
        ids = {"item_id": f"msg_{self.call.rid}", "output_index": at, "content_index": 0}
        return self._event("response.output_text.done", {**ids, "text": text, "logprobs": []}) + \
            self._event("response.content_part.done", {**ids, "part": part}) + \
            self._event("response.output_item.done", {"output_index": at, "item": item})

    def _close_calls(self) -> bytes:
        out = []
        for key in sorted(self.calls, key=lambda k: self.calls[k]["at"]):
            st = self.calls[key]
            args = "".join(st["args"])
            item = _function_call(self.call, st["at"], st["call_id"], st["name"], args)
            self.output.append(item)
            out.append(self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": st["at"], "name": st["name"], "arguments": args}))
            out.append(self._event("response.output_item.done", {"output_index": st["at"], "item": item}))
        self.calls = {}
        return b"".join(out)

    def _next_index(self) -> int:
        self.items += 1
        return self.items - 1

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self.started else self._start()
        choices = chunk.get("choices")
        if not choices:
            return out
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text:
            if self.text is None:
                out += self._close_calls()
                self.text_at = self._next_index()
                self.text = []
                ids = {"item_id": f"msg_{self.call.rid}", "output_index": self.text_at}
                out += self._event("response.output_item.added", {
                    "output_index": self.text_at, "item": {**_message(self.call, "", "in_progress"), "content": []}})
                out += self._event("response.content_part.added", {
                    **ids, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
            self.text.append(text)
            out += _DELTA % (self.msg_id, self.text_at, json.dumps(text).encode(), self.seq)
            self.seq += 1
        parts = [out]  # one join: a chunk may carry many tool calls
        for tc in delta.get("tool_calls") or ():
            key = tc.get("index", 0)
            fn = tc.get("function") or {}
            st = self.calls.get(key)
            if st is None:
                parts.append(self._close_text())
                at = self._next_index()
                st = self.calls[key] = {"at": at, "call_id": tc.get("id") or f"call_{at}",
                                        "name": fn.get("name") or "", "args": []}
                item = _function_call(self.call, at, st["call_id"], st["name"], "", "in_progress")
                parts.append(self._event("response.output_item.added", {"output_index": at, "item": item}))
            if fn.get("arguments"):
                st["args"].append(fn["arguments"])
                parts.append(_ARGS % (json.dumps(f"fc_{self.call.rid}_{st['at']}").encode(), st["at"],
                                      json.dumps(fn["arguments"]).encode(), self.seq))
                self.seq += 1
        if choice.get("finish_reason"):
            self.reason = choice["finish_reason"]
        return b"".join(parts) if len(parts) > 1 else out

    def finish(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = (b"" if self.started else self._start()) + self._close_text() + self._close_calls()
        status = "incomplete" if self.reason == "length" else "completed"
        final = envelope(self.call, status, self.output, usage(prompt_tokens, completion_tokens))
        return out + self._event(f"response.{status}", {"response": final})

    def fail(self, err: NodeError) -> bytes:
        final = envelope(self.call, "failed", self.output, None)
        final["error"] = {"code": "server_error", "message": err.message}
        return self._event("response.failed", {"response": final})


RESPONSES = Route(api="responses", error=error, credential=bearer, to_openai=to_openai, from_openai=from_openai,
                  streamer=ResponseStream, native="responses", native_path="/responses")
ROUTES = {b"/v1/responses": RESPONSES}
