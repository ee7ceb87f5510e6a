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
import ssl
from collections.abc import AsyncIterator

from node.gateway.workerconn import (
    BUFFER_LIMIT,
    TICK_S,
    WRITE_SLICE,
    BrokenResponse,
    ConnectFailed,
    Origin,
    TimedOut,
    Unanswered,
    UpstreamFailure,
    WorkerConn,
)

# The errors are this client's API too: callers catch them from here.
__all__ = ["BUFFER_LIMIT", "BrokenResponse", "ConnectFailed", "Origin", "Pool", "Response", "TimedOut", "Unanswered",
           "UpstreamFailure"]


class Response:
    """A worker's answer: status and headers read, body read by `read` or `chunks`."""

    __slots__ = ("status", "headers", "_pool", "_idle", "_conn", "_timeout")

    def __init__(self, pool: Pool, idle: list[WorkerConn], conn: WorkerConn, read_timeout: float) -> None:
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

    def close(self, keep: bool = True) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it (the worker stops).

        `keep` False: drop it anyway (a worker that closes its side after such an answer, without saying so).
        """
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is not None:
            if not keep:
                conn.reusable = False
            self._pool._finish(self._idle, conn)


class Pool:
    """Keep-alive connections per origin; no limit on how many are open (the gateway bounds that)."""

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 600.0, max_idle: int = 256,
                 idle_expiry: float = 30.0) -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_idle, self.idle_expiry = max_idle, idle_expiry
        self._idle: dict[Origin, list[WorkerConn]] = {}
        self._routes: dict[str, tuple[Origin, list[WorkerConn], str]] = {}  # base URL -> origin, idle connections, head lines
        self._tls: ssl.SSLContext | None = None
        self._busy: set[WorkerConn] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_s = max(0.01, min(TICK_S, read_timeout / 8))

    def origin(self, base_url: str) -> Origin:
        return self._route(base_url)[0]

    def _route(self, base_url: str) -> tuple[Origin, list[WorkerConn], str]:
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

    async def _send_body(self, conn: WorkerConn, body: bytes, read_timeout: float) -> None:
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

    def _take(self, idle: list[WorkerConn]) -> WorkerConn | None:
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < self.idle_expiry:
                return conn
            conn.abort()
        return None

    def _finish(self, idle: list[WorkerConn], conn: WorkerConn) -> None:
        self._busy.discard(conn)
        if conn.done and not conn.pieces and conn.keep_alive and conn.reusable and not conn.closed \
                and len(idle) < self.max_idle:
            conn.rest()
            idle.append(conn)
        else:
            conn.abort()

    def _drop(self, conn: WorkerConn) -> None:
        self._busy.discard(conn)
        conn.abort()

    async def _connect(self, origin: Origin, timeout: float) -> WorkerConn:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: WorkerConn(loop), origin.host, origin.port, ssl=tls), timeout)
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
