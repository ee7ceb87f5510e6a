"""Logging: JSON lines for journald, readable lines on a terminal; never a secret.

Every line has time, level, logger and event; request lines add request_id, model,
key_id (the key's id, never its secret), status and latency_ms. Anything that looks
like an API key or a bearer token is masked on the way out, whoever logged it.
Prompts are never logged: the node does not put request bodies in log records.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import re
import sys
import time
from typing import Any

FIELDS = ("request_id", "model", "key_id", "status", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens",
          "endpoint", "replica", "error", "prompt")
ACCESS_LOGGER = "infernode.access"
# sk-... keys (node keys, admin keys, OpenAI-style), bearer tokens and key=value secrets.
_SECRET_RE = re.compile(
    r"(?i)(\bsk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]{6,}"
    r"|(\bbearer\s+)[A-Za-z0-9_\-.~+/=]{8,}"
    r"|(\b(?:api[_-]?key|secret|password|token|master[_-]?key)\"?\s*[=:]\s*\"?)[^\s\"',;&]{4,}"
)


def redact(text: str) -> str:
    """Mask secrets in a log line (keeps a short prefix so a key can still be recognised)."""
    if "sk-" not in text and "earer" not in text and "=" not in text and ":" not in text:
        return text
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "***", text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out = {}
    for f in FIELDS:
        v = getattr(record, f, None)
        if v is not None:
            out[f] = redact(v) if isinstance(v, str) else v
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """A short readable line, for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{line} {extra}" if extra else line


MAX_QUEUED = 100_000


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting and the write to stdout
    (a pipe to journald, or a file) happen off the event loop, never on the request path."""

    dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.queue.qsize() >= MAX_QUEUED:  # stdout is stuck: drop rather than block or grow without bound
            self.dropped += 1
            return
        self.queue.put_nowait(record)


def setup_logging(fmt: str = "auto", level: int = logging.INFO) -> logging.handlers.QueueListener:
    """Route the node's and uvicorn's logs to stdout in one format, written by a background thread.

    Returns the writer; the caller's `stop()` writes out what is queued.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    # SimpleQueue: a put is cheap (no Condition to notify), which matters once per request.
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    writer.start()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return writer


_access = logging.getLogger(ACCESS_LOGGER)


def access(request_id: str, model: str, key_id: str | None, status: int, latency_s: float, *,
           endpoint: str = "", ttft_s: float | None = None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """One line per finished /v1 request (the gateway's access log); cheap when disabled."""
    if not _access.isEnabledFor(logging.INFO):
        return
    _access.info("request", extra={
        "request_id": request_id, "model": model, "key_id": key_id, "status": status,
        "latency_ms": round(latency_s * 1000, 2), "endpoint": endpoint or None,
        "ttft_ms": round(ttft_s * 1000, 2) if ttft_s is not None else None,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
    })
