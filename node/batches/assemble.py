"""A streamed answer put back together: the chat.completion or text_completion the same request gives unstreamed.

A batch line the node may preempt goes to some runtimes as a stream (runtimes' LaunchPlan
`stops_unstreamed_late`: a dropped stream stops at its next token, a dropped plain request
only later); its output file still holds the whole answer, as OpenAI's Batch API gives it.
Pieces are joined per choice `index`: content, reasoning, refusal, tool calls (by their
own index: id, type and name from the first piece that has them, arguments
concatenated), logprobs, the finish reason; the usage chunk becomes `usage`. One pass,
linear in the stream's size.
"""

from __future__ import annotations

import json
from typing import Any

TEXT_FIELDS = ("content", "reasoning_content", "refusal")   # chat delta fields that are concatenated
COMPLETION_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class Unassembled(ValueError):
    """A stream that does not make an answer: an error event, bad JSON, or no chunk at all."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error or {"message": message, "type": "server_error", "code": "bad_worker_stream"}


def events(sse: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order (an event's data lines joined by newlines)."""
    out: list[bytes] = []
    data: list[bytes] = []
    for line in sse.splitlines():
        if not line:
            if data:
                out.append(b"\n".join(data))
                data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    if data:
        out.append(b"\n".join(data))
    return out


def assemble(sse: bytes, endpoint: str) -> dict[str, Any]:
    """The whole answer of a streamed `chat` or `completions` request; Unassembled when there is none."""
    chat = endpoint == "chat"
    head: dict[str, Any] | None = None
    usage: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for payload in events(sse):
        if payload == b"[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise Unassembled("the worker's stream held an event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise Unassembled("the worker's stream held an event that is not a JSON object")
        if "error" in chunk:
            err = chunk["error"]
            raise Unassembled(str(err.get("message") if isinstance(err, dict) else err),
                              err if isinstance(err, dict) else None)
        if head is None:
            head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        if chunk.get("usage"):
            usage = chunk["usage"]
        for piece in chunk.get("choices") or ():
            if isinstance(piece, dict):
                _add(choices.setdefault(int(piece.get("index") or 0), _empty(chat)), piece, chat)
    if head is None:
        raise Unassembled("the worker's stream ended before its first chunk")
    answer: dict[str, Any] = {"id": head.get("id"), "object": "chat.completion" if chat else "text_completion",
                              "created": head.get("created"), "model": head.get("model")}
    if "system_fingerprint" in head:
        answer["system_fingerprint"] = head["system_fingerprint"]
    answer["choices"] = [_finish(i, choices[i], chat) for i in sorted(choices)]
    if usage is not None:
        answer["usage"] = usage
    return answer


def _empty(chat: bool) -> dict[str, Any]:
    return {"parts": {}, "tools": {}, "logprobs": None, "finish_reason": None, "role": "assistant"}


def _add(acc: dict[str, Any], piece: dict[str, Any], chat: bool) -> None:
    parts: dict[str, list[str]] = acc["parts"]
    if chat:
        delta = piece.get("delta") or {}
        if delta.get("role"):
            acc["role"] = delta["role"]
        for name in TEXT_FIELDS:
            text = delta.get(name)
            if isinstance(text, str):
                parts.setdefault(name, []).append(text)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                _add_call(acc["tools"], call)
    elif isinstance(piece.get("text"), str):
        parts.setdefault("text", []).append(piece["text"])
    lp = piece.get("logprobs")
    if isinstance(lp, dict):
        _add_logprobs(acc, lp, chat)
    if piece.get("finish_reason") is not None:
        acc["finish_reason"] = piece["finish_reason"]


def _add_call(tools: dict[int, dict[str, Any]], call: dict[str, Any]) -> None:
    t = tools.setdefault(int(call.get("index") or 0), {"id": None, "type": "function", "name": None, "args": []})
    t["id"] = t["id"] or call.get("id")
    t["type"] = call.get("type") or t["type"]
    fn = call.get("function") or {}
    t["name"] = t["name"] or fn.get("name")
    if isinstance(fn.get("arguments"), str):
        t["args"].append(fn["arguments"])


def _add_logprobs(acc: dict[str, Any], lp: dict[str, Any], chat: bool) -> None:
    have = acc["logprobs"]
    if have is None:
        have = acc["logprobs"] = {}
    for name in ("content", "refusal") if chat else COMPLETION_LOGPROBS:
        items = lp.get(name)
        if isinstance(items, list):
            have.setdefault(name, []).extend(items)


def _finish(index: int, acc: dict[str, Any], chat: bool) -> dict[str, Any]:
    parts = acc["parts"]
    if not chat:
        return {"index": index, "text": "".join(parts.get("text", ())), "logprobs": acc["logprobs"],
                "finish_reason": acc["finish_reason"]}
    message: dict[str, Any] = {"role": acc["role"], "content": "".join(parts["content"]) if "content" in parts else None}
    for name in ("reasoning_content", "refusal"):
        if name in parts:
            message[name] = "".join(parts[name])
    if acc["tools"]:
        message["tool_calls"] = [{"id": t["id"], "type": t["type"],
                                  "function": {"name": t["name"], "arguments": "".join(t["args"])}}
                                 for _, t in sorted(acc["tools"].items())]
    return {"index": index, "message": message, "logprobs": acc["logprobs"], "finish_reason": acc["finish_reason"]}
