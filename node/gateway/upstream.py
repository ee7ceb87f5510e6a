"""A small HTTP/1.1 keep-alive client for talking to workers, over asyncio.Protocol.

The gateway's hot path spends most of its CPU in the HTTP client; a general client
(httpx) costs several times what forwarding one request needs, and even asyncio's
streams add a buffer copy, a timer and a few awaits per read. This one does only what
the gateway needs: POST/GET with a byte body, content-length, chunked or read-to-EOF
answers parsed by llhttp (through httptools) as their bytes arrive, keep-alive
connections pooled per worker, and errors that say whether anything was sent or
received (so the gateway knows when a retry on another replica is safe: only when the
worker cannot have received the request, `ConnectFailed`; never once its bytes were
written, `Unanswered`). Read and connect timeouts are per request (per model).
Credentials in a base URL (`http://user:pass@host`) are sent as `Authorization: Basic`,
never in the Host header.

A wait costs no timer: it records its deadline, and one timer per pool, armed while
requests are in flight, times out the waits past theirs every tick (a second, or an
eighth of a shorter read timeout). Memory stays bounded both ways: reading from a worker
pauses while more than BUFFER_LIMIT bytes of its body wait for a slow consumer, and a
large request body is written a slice at a time, each once the worker took the last.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
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


class _SecondAnswer(Exception):
    """The worker began another answer to a request it had already answered."""


class _Conn(asyncio.Protocol):
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
            raise _SecondAnswer()

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


class Response:
    """A worker's answer: status and headers read, body read by `read` or `chunks`."""

    __slots__ = ("status", "headers", "_pool", "_idle", "_conn", "_timeout")

    def __init__(self, pool: Pool, idle: list[_Conn], conn: _Conn, read_timeout: float) -> None:
        self._pool, self._idle, self._conn = pool, idle, conn
        self.status = conn.status
        self.headers = conn.headers
        self._timeout = read_timeout

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn.done:  # the usual case: the whole answer came in one read
            return conn.take() if conn.pieces else b""
        parts = []
        while True:
            if conn.pieces:
                parts.append(conn.take())
            if conn.done:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._timeout)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed): all that came since the last piece."""
        conn = self._conn
        loop = conn.loop
        while True:
            pieces = conn.pieces
            if pieces:  # conn.take() and conn.wait(), inlined: this loop turns once per network read
                conn.pieces = []
                conn.size = 0
                if conn.paused_reading:
                    conn.resume()
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            elif conn.done:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                conn.waiter = w = loop.create_future()
                conn.deadline = loop.time() + self._timeout
                await w

    def drain_timeout(self, seconds: float) -> None:
        """From now on, wait at most this long for more body bytes."""
        self._timeout = min(self._timeout, seconds)

    def close(self) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it (the worker stops)."""
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            self._pool._finish(self._idle, conn)


class Pool:
    """Keep-alive connections per origin; no limit on how many are open (the gateway bounds that)."""

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 600.0, max_idle: int = 256,
                 idle_expiry: float = 30.0) -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_idle, self.idle_expiry = max_idle, idle_expiry
        self._idle: dict[Origin, list[_Conn]] = {}
        self._routes: dict[str, tuple[Origin, list[_Conn], str]] = {}  # base URL -> origin, idle connections, head lines
        self._tls: ssl.SSLContext | None = None
        self._busy: set[_Conn] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_s = max(0.01, min(TICK_S, read_timeout / 8))

    def origin(self, base_url: str) -> Origin:
        return self._route(base_url)[0]

    def _route(self, base_url: str) -> tuple[Origin, list[_Conn], str]:
        route = self._routes.get(base_url)
        if route is None:
            origin = Origin.parse(base_url)
            idle = self._idle.setdefault(origin, [])
            lines = f"host: {origin.host_header.decode('latin-1')}\r\n"
            if origin.authorization:
                lines += f"authorization: {origin.authorization}\r\n"
            route = self._routes[base_url] = (origin, idle, lines)
        return route

    async def request(self, method: str, base_url: str, path: str, body: bytes = b"",
                      headers: tuple[tuple[str, str], ...] = (), *, read_timeout: float | None = None,
                      connect_timeout: float | None = None) -> Response:
        """Send a request to base_url + path; return once the status and headers arrived.

        A pooled connection is used only if it is still open when the request is written; a
        failure before any byte is written (refused, pooled connection found closed) is
        ConnectFailed, one after is Unanswered or BrokenResponse, and the request is never re-sent.
        """
        origin, idle, lines = self._route(base_url)
        read_timeout = self.read_timeout if read_timeout is None else read_timeout
        if read_timeout < self._tick_s * 8:
            self._tick_s = max(0.01, read_timeout / 8)
        text = f"{lines}content-length: {len(body)}\r\n"
        for k, v in headers:
            text += f"{k}: {v}\r\n"
        head = f"{method} {origin.prefix}{path} HTTP/1.1\r\n".encode() + (text + "\r\n").encode("latin-1")
        if len(body) <= WRITE_SLICE:
            head += body
            body = b""
        while True:
            conn, fresh = self._take(idle), False
            if conn is None:
                conn = await self._connect(origin, self.connect_timeout if connect_timeout is None else connect_timeout)
                fresh = True
            conn.begin()
            if conn.error is not None or conn.transport.is_closing():
                self._drop(conn)  # found closed before anything was written: nothing reached the worker
                if fresh:
                    raise ConnectFailed("the worker closed a new connection before the request was sent")
                continue  # a pooled one the worker had closed: another (or a fresh one)
            self._busy.add(conn)
            if self._ticker is None:
                self._ticker = conn.loop.call_at(conn.loop.time() + self._tick_s, self._tick, conn.loop)
            try:
                conn.sent = True
                conn.transport.write(head)
                if body:
                    await self._send_body(conn, body, read_timeout)
                while not conn.status:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(read_timeout)
                return Response(self, idle, conn, read_timeout)
            except BaseException:
                self._drop(conn)
                raise

    async def _send_body(self, conn: _Conn, body: bytes, read_timeout: float) -> None:
        # A slice at a time, each once the transport's buffer drained, so a large body is never copied whole.
        view = memoryview(body)
        for start in range(0, len(view), WRITE_SLICE):
            while conn.paused_writing and not (conn.status or conn.closed or conn.error is not None):
                await conn.wait(read_timeout)
            if conn.status or conn.closed or conn.error is not None:
                conn.reusable = False  # the worker answered, or went away, before it took the whole body
                return
            conn.transport.write(view[start:start + WRITE_SLICE])

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for conn in self._busy:
            if conn.waiter is not None:
                conn.time_out(now)
        self._ticker = loop.call_at(now + self._tick_s, self._tick, loop) if self._busy else None

    def _take(self, idle: list[_Conn]) -> _Conn | None:
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < self.idle_expiry:
                return conn
            conn.abort()
        return None

    def _finish(self, idle: list[_Conn], conn: _Conn) -> None:
        self._busy.discard(conn)
        if conn.done and not conn.pieces and conn.keep_alive and conn.reusable and not conn.closed \
                and len(idle) < self.max_idle:
            conn.rest()
            idle.append(conn)
        else:
            conn.abort()

    def _drop(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        conn.abort()

    async def _connect(self, origin: Origin, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(loop), origin.host, origin.port, ssl=tls), timeout)
        except TimeoutError:
            raise ConnectFailed(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}") from None
        return conn

    async def aclose(self) -> None:
        """Close every idle connection."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
            idle.clear()
