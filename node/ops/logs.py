"""Logging: JSON lines for journald, readable lines on a terminal; never a secret.

Every line has time, level, logger and event; request lines add request_id, model,
key_id (the key's id, never its secret), status and latency_ms. Anything that looks
like an API key or a bearer token is masked on the way out, whoever logged it.
Prompts are never logged: the node does not put request bodies in log records.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import deque
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


# C0 and C1 control characters and DEL: a client's text (a model name, a request id) must not
# end a text line early, forge another, or send escape sequences to a terminal.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (\\n, \\x1b, ...), so one record stays one line."""
    return _CONTROL_RE.sub(_escape_char, text) if _CONTROL_RE.search(text) else text


class TextFormatter(logging.Formatter):
    """A short readable line, for a person at a terminal (control characters escaped)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = redact(self.formatMessage(record))
        extra = " ".join(f"{k}={escape_controls(str(v))}" for k, v in _fields(record).items())
        if extra:
            line = f"{line} {extra}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # the traceback keeps its lines; anything else that could forge one is escaped
            line += "\n" + redact(_CONTROL_BUT_NEWLINE_RE.sub(_escape_char, record.exc_text))
        if record.stack_info:
            line += "\n" + _CONTROL_BUT_NEWLINE_RE.sub(_escape_char, self.formatStack(record.stack_info))
        return line


MAX_QUEUED = 100_000
WRITE_EVERY_S = 0.05


class LogWriter:
    """Writes queued records to the real handler from a background thread.

    The request path only appends a record to a deque (no lock to notify, no syscall);
    the thread wakes every WRITE_EVERY_S, formats and writes what has gathered. When
    stdout is stuck and MAX_QUEUED records wait, new ones are dropped and counted
    rather than blocking requests or growing without bound. Access lines, one per /v1
    request, are queued as plain tuples and formatted here: a LogRecord costs the event
    loop more than the whole rest of the request's bookkeeping.
    """

    def __init__(self, handler: logging.StreamHandler) -> None:
        self.handlers = [handler]
        self.records: deque[logging.LogRecord | tuple] = deque()
        self._second = -1
        self._stamps = ("", "")
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _drain(self) -> None:
        handler = self.handlers[0]
        as_json = isinstance(handler.formatter, JsonFormatter)
        lines: list[str] = []
        while self.records:
            rec = self.records.popleft()
            if type(rec) is tuple:
                lines.append(self._access_line(rec, as_json))
                continue
            if lines:
                self._write(handler, lines)
            handler.handle(rec)  # type: ignore[arg-type]
        if lines:
            self._write(handler, lines)
        handler.flush()

    @staticmethod
    def _write(handler: logging.StreamHandler, lines: list[str]) -> None:
        try:
            handler.stream.write("".join(lines))
        except (OSError, ValueError):
            pass  # stdout gone (journald restarting): the lines are lost, requests are not
        lines.clear()

    def _access_line(self, rec: tuple, as_json: bool) -> str:
        ts, rid, model, key_id, status, latency_s, endpoint, ttft_s, prompt_tokens, completion_tokens = rec
        second = int(ts)
        if second != self._second:  # the formatted time changes once a second
            self._second = second
            self._stamps = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
                            time.strftime("%H:%M:%S", time.localtime(second)))
        rid = redact(rid)
        latency_ms = round(latency_s * 1000, 2)
        ttft_ms = round(ttft_s * 1000, 2) if ttft_s is not None else None
        if as_json:
            # Built by hand (strings JSON-quoted): a dict through json.dumps costs twice as much, per request.
            q = _json_string
            return "".join((
                '{"time": "', self._stamps[0], ".%03dZ" % (int(ts * 1000) % 1000),
                '", "level": "info", "logger": "', ACCESS_LOGGER, '", "event": "request", "request_id": ', q(rid),
                ', "model": ', q(model), ', "key_id": ' + q(key_id) if key_id is not None else "",
                ', "status": %d, "latency_ms": %r' % (status, latency_ms),
                ', "ttft_ms": %r' % ttft_ms if ttft_ms is not None else "",
                ', "prompt_tokens": %d, "completion_tokens": %d' % (prompt_tokens, completion_tokens),
                ', "endpoint": ' + q(endpoint) if endpoint else "", "}\n"))
        fields = {"request_id": rid, "model": model, "key_id": key_id, "status": status, "latency_ms": latency_ms,
                  "ttft_ms": ttft_ms, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "endpoint": endpoint or None}
        extra = " ".join(f"{k}={escape_controls(str(v))}" for k, v in fields.items() if v is not None)
        return f"{self._stamps[1]} INFO    {ACCESS_LOGGER}: request {extra}\n"

    def _run(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            self._drain()

    def stop(self) -> None:
        """Write out what is queued and end the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._drain()
        global _writer
        if _writer is self:
            _writer = None


class _Enqueue(logging.Handler):
    """Hands records to the LogWriter as they are: formatting and the write to stdout
    (a pipe to journald, or a file) happen off the event loop, never on the request path."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: deque.append is atomic
        if len(self.writer.records) >= MAX_QUEUED:
            self.writer.dropped += 1
        else:
            self.writer.records.append(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


def setup_logging(fmt: str = "auto", level: int = logging.INFO) -> LogWriter:
    """Route the node's logs to stdout in one format, written by a background thread.

    Returns the writer; the caller's `stop()` writes out what is queued.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    writer = LogWriter(handler)
    writer.start()
    global _writer
    _writer = writer
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(writer)]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return writer


_access = logging.getLogger(ACCESS_LOGGER)
_json_string = json.encoder.encode_basestring_ascii
_writer: LogWriter | None = None  # where access lines go once setup_logging ran (logging is process-wide)


def access(request_id: str, model: str, key_id: str | None, status: int, latency_s: float,
           endpoint: str = "", ttft_s: float | None = None, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """One line per finished /v1 request (the gateway's access log); cheap when disabled."""
    if not _access.isEnabledFor(logging.INFO):
        return
    writer = _writer
    if writer is not None and _access.propagate and not _access.handlers:
        if len(writer.records) >= MAX_QUEUED:
            writer.dropped += 1
        else:
            writer.records.append((time.time(), request_id, model, key_id, status, latency_s, endpoint, ttft_s,
                                   prompt_tokens, completion_tokens))
        return
    _access.info("request", extra={
        "request_id": request_id, "model": model, "key_id": key_id, "status": status,
        "latency_ms": round(latency_s * 1000, 2), "endpoint": endpoint or None,
        "ttft_ms": round(ttft_s * 1000, 2) if ttft_s is not None else None,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
    })
