"""OpenAI response bodies as the gateway reads them: usage, and a worker's errors."""

from __future__ import annotations

import json
from typing import Any


def usage_of(raw: bytes) -> dict[str, Any] | None:
    """The `usage` object of a non-streamed answer, if it has one."""
    if b'"usage"' not in raw:
        return None
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
