"""OpenAI response bodies as the gateway reads them: usage and its token counts, and a worker's errors."""

from __future__ import annotations

import json
import re
from typing import Any

from node.errors import NodeError

_DECODER = json.JSONDecoder()
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*\{')
MESSAGE_CHARS = 1000  # a worker's error message as a client sees it, at most
# What a worker's error may carry that a client must not see: traceback lines and file paths.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \"", re.M)
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+@~-]+)+\.\w{1,8}\b"  # a file: /x/y/app.py, C:\\m\\w.gguf
                   r"|/(?:home|usr|opt|tmp|var|root|srv|mnt|data|app|lib|etc|run|proc|nix|Users|work)\b[\w.+@~/-]*"
                   r"|\b[\w-]+\.pyc?\b")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


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


def scrub(message: str) -> str:
    """A worker's error message without its internals: no traceback, no file paths, no control characters, bounded."""
    message = message[:4 * MESSAGE_CHARS]
    cut = _TRACEBACK.search(message)
    if cut is not None:
        message = message[:cut.start()]
    message = _CONTROL.sub(" ", _PATH.sub("<path>", message)).strip()
    return message[:MESSAGE_CHARS] or "the worker refused the request"


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
    """The message of a worker's error body (OpenAI's shape, FastAPI's `detail`, or text), scrubbed of internals."""
    return scrub(_message_of(raw))


def _message_of(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
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
    """A worker's error, in OpenAI's shape, marked as coming from the worker, its message scrubbed."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    if isinstance(err, dict):
        message, param, code = err.get("message"), err.get("param"), err.get("code")
        if isinstance(err.get("type"), str) and status < 500:
            kind = err["type"]
    else:
        message = obj.get("detail") if isinstance(obj, dict) and "detail" in obj else err
        param, code = None, str(status)
        if message is None:
            message = raw[:4 * MESSAGE_CHARS].decode("utf-8", "replace")
    if not isinstance(message, str):
        message = json.dumps(message)[:4 * MESSAGE_CHARS]
    return json.dumps({"error": {
        "message": scrub(message), "type": kind[:64], "param": param if isinstance(param, str) else None,
        "code": code if isinstance(code, (str, int)) and not isinstance(code, bool) else None,
        "source": "worker"}}).encode()
