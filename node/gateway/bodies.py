"""OpenAI response bodies as the gateway reads them: usage, and a worker's errors."""

from __future__ import annotations

import json
import re
from typing import Any

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
