"""Server-sent events passed through whole, looking only at what usage accounting needs.

The SSE spec lets a server end lines with CRLF, LF or CR; the relay turns CRLF and CR into
LF as the bytes arrive (JSON data cannot hold a raw CR, so only framing changes), so a
CRLF-framed stream is relayed event by event like any other.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

ID_RE = re.compile(rb'"id"\s*:\s*"([^"]*)"')
# Servers differ in JSON spacing ("content":"x" vs "content": "x").
CONTENT_MARKS = (b'"content":"', b'"content": "', b'"text":"', b'"text": "')
EMPTY_MARKS = (b'"content":""', b'"content": ""', b'"text":""', b'"text": ""')
MAX_PENDING = 1 << 20


class SseRelay:
    """Passes SSE bytes through whole events at a time, noting usage and tokens.

    `drop_usage`: hide the usage-only chunk the node asked for on the client's behalf.
    `count_content`: the runtime sends no usage; count one token per content event.
    """

    def __init__(self, *, drop_usage: bool, count_content: bool) -> None:
        self.drop_usage, self.count_content = drop_usage, count_content
        self._buf: bytes | bytearray = b""  # an incomplete event (a bytearray while it arrives in pieces)
        self.usage: dict[str, Any] | None = None
        self.content_events = 0
        self.first_content = False
        self.stream_id: bytes | None = None
        self.saw_done = False
        self._cr = False  # the last chunk ended with a CR (already an LF here): a leading LF is its pair

    @property
    def buf(self) -> bytes:
        """What is held of an incomplete event."""
        return self._buf if isinstance(self._buf, bytes) else bytes(self._buf)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events so far (line endings as LF, the hidden usage chunk removed)."""
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._buf:
            if b"\n\n" not in chunk and not (chunk[:1] == b"\n" and self._buf[-1:] == b"\n"):
                # Still inside one event: grow it in place (joining the held part per chunk is quadratic).
                if not isinstance(self._buf, bytearray):
                    self._buf = bytearray(self._buf)
                self._buf += chunk
                if len(self._buf) > MAX_PENDING:  # a pathological event: pass it on rather than grow
                    data, self._buf = bytes(self._buf), b""
                    return data
                return b""
            data = bytes(self._buf) + chunk
        else:
            data = chunk
        if data.endswith(b"\n\n"):  # the common case: one or more whole events
            out, self._buf = data, b""
        else:
            cut = data.rfind(b"\n\n")
            if cut < 0:
                if len(data) > MAX_PENDING:  # a pathological event: pass it on rather than grow
                    self._buf = b""
                    return data
                self._buf = data
                return b""
            out, self._buf = data[: cut + 2], data[cut + 2:]
        if self.count_content or not self.first_content:
            n = 0
            for p in CONTENT_MARKS:
                if p in out:
                    n += out.count(p)
            if n:
                for p in EMPTY_MARKS:
                    if p in out:
                        n -= out.count(p)
            if n > 0:
                self.first_content = True
                self.content_events += n
            if self.stream_id is None:
                m = ID_RE.search(out)
                if m:
                    self.stream_id = m.group(1)
        if b'"usage"' in out:
            out = self._take_usage(out)
        if b"data: [DONE]" in out:
            self.saw_done = True
        return out

    def _take_usage(self, out: bytes) -> bytes:
        kept = []
        for event in out.split(b"\n\n"):
            if not event:
                continue
            at = 0 if event.startswith(b"data:") else event.find(b"\ndata:") + 1  # after an `event:` line
            if b'"usage"' in event and at >= 0 and event.startswith(b"data:", at):
                try:
                    obj = json.loads(event[at + 5:])
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]
                    if self.drop_usage and not obj.get("choices"):
                        continue
                elif isinstance(obj, dict) and isinstance(obj.get("response"), dict) and \
                        isinstance(obj["response"].get("usage"), dict):  # a Responses API stream's last event
                    self.usage = obj["response"]["usage"]
            kept.append(event)
        return b"".join(e + b"\n\n" for e in kept)

    def synth_usage(self, out: bytes, *, model: str, chat: bool, prompt_tokens: int) -> bytes:
        """Insert the usage chunk a runtime without stream usage cannot send, before `[DONE]`."""
        cut = out.rfind(b"data: [DONE]")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": self.content_events,
                 "total_tokens": prompt_tokens + self.content_events}
        obj: dict[str, Any] = {"id": (self.stream_id or b"").decode(), "object": "chat.completion.chunk" if chat else "text_completion",
               "created": int(time.time()), "model": model, "choices": [], "usage": usage}
        self.saw_done = False
        return out[:cut] + b"data: " + json.dumps(obj).encode() + b"\n\n" + out[cut:]
