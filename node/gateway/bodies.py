"""OpenAI response bodies as the gateway reads them: usage and its token counts, and a worker's errors."""

from __future__ import annotations

import json
import re
from typing import Any

from node.errors import NodeError

_DECODER = json.JSONDecoder()
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*\{')


def usage_of(raw: bytes) -> dict[str, Any] | None:
    """The `usage` object of a non-streamed answer, if it has one.

    Only the usage object is decoded, not the whole answer: servers put it last, and a
    `"usage"` key cannot occur inside a JSON string (its quotes would be escaped). A
    body where that shortcut finds nothing usable is decoded whole.
    """
    at = raw.rfind(b'"usage"')
    if at < 0:
        return None
    m = _USAGE_VALUE.match(raw, at)
    if m is not None:
        try:
            usage, _ = _DECODER.raw_decode(raw[m.end() - 1:].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            usage = None
        if isinstance(usage, dict) and "prompt_tokens" in usage:
            return usage
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def tokens(usage: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of a usage object: OpenAI's chat/completions names, or the Responses API's."""
    return (int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0),
            int(usage.get("completion_tokens") or usage.get("output_tokens") or 0))


class WorkerRefused(NodeError):
    """The worker's own 4xx/5xx, carried into another API's error shape."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, source="worker")
        self.status = status if status < 500 else 502
        self.type = "invalid_request_error" if status < 500 else "upstream_error"


def worker_message(raw: bytes) -> str:
    """The message of a worker's error body (OpenAI's shape, FastAPI's `detail`, or text)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:2000]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if "detail" in obj:
            return obj["detail"] if isinstance(obj["detail"], str) else json.dumps(obj["detail"])[:2000]
    return json.dumps(obj)[:2000]


def worker_error(raw: bytes, status: int) -> bytes:
    """A worker's error, in OpenAI's shape, marked as coming from the worker."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        obj["error"]["source"] = "worker"
        obj["error"].setdefault("type", "invalid_request_error" if status < 500 else "upstream_error")
        return json.dumps(obj).encode()
    message = obj.get("detail") if isinstance(obj, dict) and "detail" in obj else raw.decode("utf-8", "replace")[:2000]
    if not isinstance(message, str):
        message = json.dumps(message)
    return json.dumps({"error": {
        "message": message, "type": "invalid_request_error" if status < 500 else "upstream_error",
        "param": None, "code": str(status), "source": "worker"}}).encode()
