"""One keep-alive HTTP/1.1 connection to a worker (an asyncio.Protocol), and the errors it reports.

llhttp (through httptools) parses the answer to the request in flight as its bytes
arrive: content-length, chunked or read-to-EOF. The errors say whether anything was sent
or received, which decides whether the gateway may retry on another replica
(`ConnectFailed`: never written; `Unanswered`: written, so never resent). The pool and
the answers the gateway reads are node/gateway/upstream.py.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httptools

MAX_HEAD = 64 * 1024
BUFFER_LIMIT = 256 * 1024   # body bytes waiting for the consumer before reading from the worker pauses
WRITE_SLICE = 256 * 1024    # request bodies larger than this are written a slice at a time
TICK_S = 1.0                # waits are checked against their deadlines this often (or more often)



class UpstreamFailure(Exception):
    """The worker could not be reached or broke the protocol."""


class ConnectFailed(UpstreamFailure):
    """No connection, or a pooled one found closed before the request was written: safe to retry elsewhere."""


class Unanswered(UpstreamFailure):
    """The request was written (the worker may have acted on it) but the connection ended without an answer."""


class BrokenResponse(UpstreamFailure):
    """The worker went away or sent bad framing after its answer began."""


class TimedOut(UpstreamFailure):
    """The worker did not answer (or send more) within the read timeout."""


@dataclass(frozen=True)
class Origin:
    """Where a base URL points: scheme, host, port and path prefix."""

    tls: bool
    host: str
    port: int
    prefix: str
    host_header: bytes
    authorization: str | None = field(default=None, repr=False)  # from the URL's user:password

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        u = urlsplit(base_url)
        tls = u.scheme == "https"
        port = u.port or (443 if tls else 80)
        host = u.hostname or "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if u.port is None else f"{shown}:{u.port}"  # never the userinfo
        auth = None
        if u.username is not None or u.password is not None:
            pair = f"{unquote(u.username or '')}:{unquote(u.password or '')}"
            auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(tls, host, port, u.path.rstrip("/"), host_header.encode(), auth)


class SecondAnswer(Exception):
    """The worker began another answer to a request it had already answered."""


class WorkerConn(asyncio.Protocol):
    """One connection to a worker: parses the answer to the request in flight as its bytes arrive.

    The task that sent the request is the only one waiting on it, on `waiter`, which the
    protocol callbacks resolve when the head is complete, body bytes arrive, the body
    ends, the connection fails, or writing may go on.
    """

    __slots__ = ("loop", "transport", "parser", "closed", "reusable", "busy", "idle_since", "waiter", "deadline",
                 "paused_reading", "paused_writing", "status", "headers", "keep_alive", "done", "error", "pieces",
                 "size", "head_bytes", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        # With both, chunked framing wins over a content-length (RFC 9112 6.3), as it always did here.
        self.parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self.closed = False           # the worker closed or reset the connection (or we aborted it)
        self.reusable = True          # nothing spoiled the connection for another request
        self.busy = False             # a request is in flight (its Response not closed yet)
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.deadline = 0.0           # when the pending wait times out
        self.paused_reading = False
        self.paused_writing = False
        # The answer to the request in flight.
        self.status = 0               # 0 until the head of the (final, non-1xx) answer is complete
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.done = False             # the answer's body ended
        self.error: UpstreamFailure | None = None
        self.pieces: list[bytes] = []  # body bytes not yet taken by the consumer
        self.size = 0                 # their length
        self.head_bytes = 0           # bytes received before the head was complete
        self.sent = False             # bytes of the request in flight were written

    def begin(self) -> None:
        """Forget the last answer: a new request is about to be sent."""
        self.busy = True
        self.status = 0
        self.headers = []
        self.keep_alive = False
        self.done = False
        self.error = None
        if self.closed:  # e.g. a fresh connection the worker closed before it was used: nothing would wake a wait
            self.error = ConnectFailed("the worker closed the connection without answering")
        self.pieces = []
        self.size = 0
        self.head_bytes = 0
        self.sent = False

    def rest(self) -> None:
        """The answer was read to its end: idle in the pool until the next request."""
        self.busy = False
        self.status = 0
        self.pieces = []
        self.size = 0
        self.waiter = None
        self.idle_since = self.loop.time()
        if self.paused_reading:
            self.paused_reading = False
            self.transport.resume_reading()  # so that the worker closing it is noticed

    def abort(self) -> None:
        """Drop the connection at once (this is how a worker learns its answer is no longer wanted)."""
        self.closed = True
        self.transport.abort()

    def wait(self, timeout: float) -> asyncio.Future[None]:
        """A future resolved when something happens on the connection; the pool times it out."""
        self.waiter = w = self.loop.create_future()
        self.deadline = self.loop.time() + timeout
        return w

    def time_out(self, now: float) -> None:
        w = self.waiter
        if w is not None and now >= self.deadline:
            self.waiter = None
            if not w.done():
                w.set_exception(TimedOut("the worker sent nothing for too long" if self.status
                                         else "the worker did not answer in time"))

    def take(self) -> bytes:
        """The body bytes that arrived since the last take."""
        pieces = self.pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self.pieces = []
        self.size = 0
        if self.paused_reading:
            self.resume()
        return data

    def resume(self) -> None:
        """The consumer took the buffered body: read from the worker again."""
        self.paused_reading = False
        if not self.closed:
            self.transport.resume_reading()

    def _wake(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.status:
            if not self.busy:
                # Bytes while idle in the pool: whatever they are, the connection cannot carry another request.
                self.reusable = False
                self.abort()
                return
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.reusable = False
            if self.error is None and not self.done:
                self.error = BrokenResponse(f"the worker's response is malformed ({exc})")
        if not self.status and self.head_bytes > MAX_HEAD and self.error is None:
            self.error = BrokenResponse("the worker's response headers are too large")
        if self.size > BUFFER_LIMIT and not self.paused_reading:
            # The consumer is slower than the worker: let TCP push back rather than buffer without end.
            self.paused_reading = True
            self.transport.pause_reading()
        w = self.waiter
        if w is not None and (self.status or self.error is not None):
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def eof_received(self) -> None:
        self._ended(None)  # returning None: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.waiter is not None:
            self._wake()

    def _ended(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.done and self.error is None:
            if self.status:
                if self._ends_at_eof():
                    self.done = True
                else:
                    self.error = BrokenResponse("the worker closed the connection before the body ended")
            elif self.head_bytes:
                self.error = BrokenResponse("the worker's answer broke off in its headers")
            elif self.sent:  # the worker may have received it: re-sending a POST could run it twice
                self.error = Unanswered(f"the worker's connection ended after the request was sent, without an answer"
                                        f"{f' ({type(exc).__name__})' if exc is not None else ''}")
            elif exc is not None:
                self.error = ConnectFailed(f"the worker's connection failed ({type(exc).__name__})")
            else:
                self.error = ConnectFailed("the worker closed the connection without answering")
        if self.waiter is not None:
            self._wake()

    def _ends_at_eof(self) -> bool:
        for k, v in self.headers:
            if k == b"content-length" or (k == b"transfer-encoding" and b"chunked" in v.lower()):
                return False
        return True

    # -- httptools callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:
            raise SecondAnswer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.rstrip()))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.headers = []  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            return
        if self.head_bytes > MAX_HEAD and sum(len(k) + len(v) + 4 for k, v in self.headers) > MAX_HEAD:
            self.error = BrokenResponse("the worker's response headers are too large")
            raise self.error
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        if self.status:
            self.done = True
