"""The node's HTTP/1.1 server: requests parsed by httptools, answered by one handler.

The `/v1` gateway must add well under a millisecond per request. uvicorn spends about
0.1 ms of CPU per request before an app runs (ASGI message dicts, a task and a timer
per request, header validation), a third of the gateway's whole budget, so the node
serves its one port itself: llhttp (through httptools) parses, one task per connection
answers its requests in order, and responses are written with a single `write` each.
Everything that is not `/v1` (the admin API, FastAPI) is served through a small ASGI
bridge (node/gateway/asgi.py).

Hygiene a public port needs: the head of a request must arrive within
`request_timeout_s` (408), its body within the same time (408), heads are capped at
`MAX_HEAD_BYTES` (431) and bodies at `max_body_bytes` (413, also refused up front when
`content-length` or `Expect: 100-continue` says so); idle keep-alive connections close
after `keep_alive_s`; pipelined requests are answered in order with reading paused
while a few wait; a slow reader pauses the writer (`await conn.write`). A client that
goes away before its answer ended cancels the task serving it, with `conn.gone` set so
the handler can tell that from a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

import httptools

from node.errors import BodyTooLarge, HeadersTooLarge, InvalidRequest, NodeError, OperationFailed, RequestTimeout

log = logging.getLogger("infernode.httpd")

MAX_HEAD_BYTES = 64 * 1024
MAX_PIPELINED = 8          # requests parsed ahead of the one being answered before reading pauses
TICK_S = 1.0               # timeouts are checked, and the Date header renewed, once a second
STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Request:
    """One parsed request: method, raw path and query, headers (lowercased names) and the whole body."""

    __slots__ = ("method", "path", "query", "headers", "body", "http_version", "keep_alive", "refusal")

    def __init__(self, method: str, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
                 http_version: str, keep_alive: bool) -> None:
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.http_version, self.keep_alive = http_version, keep_alive
        self.body = b""
        self.refusal: NodeError | None = None  # set when the server answers this request itself

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


Handler = Callable[[Request, "Connection"], Awaitable[None]]


class _Refuse(Exception):
    def __init__(self, error: NodeError) -> None:
        self.error = error


class Connection(asyncio.Protocol):
    """One client connection: parses requests, queues them, and is what handlers answer through."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.gone = False            # the client went away before the current answer ended
        self.deadline = 0.0          # server clock time by which something must happen; 0: none
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._paused_reading = False
        self._closed = False
        self._broken = False         # the parser gave up; nothing more is read
        self._busy = False           # a handler is answering
        self._complete = True        # the current answer has been written whole
        self._started = False        # the current answer's head has been written
        self._chunked = False
        self._head_only = False
        self._keep_alive = True
        self._done_waiters: list[asyncio.Future[None]] | None = None
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_request = False

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deadline = self.server.clock + self.server.request_timeout_s
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._wake_done_waiters()
        task = self._task
        if task is None:
            return
        if self._busy and not self._complete:
            self.gone = True
            task.cancel()
        elif not self._busy:
            task.cancel()

    # No eof_received: a client's EOF closes the connection (a half-close cannot be told from
    # a client that went away, and a request must not outlive its client).

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (h2c, websocket) the node does not speak: the request is answered
            # over HTTP/1.1 and the connection closed, as RFC 9110 allows.
            self._broken = True
            self._keep_alive = False
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            self._refuse(err.error if isinstance(err, _Refuse) else InvalidRequest("malformed HTTP request"))
        except httptools.HttpParserError as exc:
            self._refuse(InvalidRequest(f"malformed HTTP request: {exc}"))

    # -- httptools callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._body_size, self._head_size = b"", [], [], 0, 0
        self._in_request = True
        self.deadline = self.server.clock + self.server.request_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refuse(HeadersTooLarge("the request line is too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refuse(HeadersTooLarge(f"the request's headers exceed {MAX_HEAD_BYTES} bytes"))
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        limit = self.server.max_body_bytes
        expect_continue = False
        for k, v in self._headers:
            if k == b"content-length":
                if v.isdigit() and int(v) > limit:
                    raise _Refuse(BodyTooLarge(f"request body is {int(v)} bytes; the limit is {limit}"))
            elif k == b"expect" and v.lower() == b"100-continue":
                expect_continue = True
        if expect_continue and self.transport is not None and not self._queue and not self._busy:
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            raise _Refuse(BodyTooLarge(f"request body exceeds the limit of {self.server.max_body_bytes} bytes"))
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self._parser
        path, _, query = self._url.partition(b"?")
        req = Request(p.get_method().decode("ascii"), path, query, self._headers, p.get_http_version(),
                      p.should_keep_alive())
        req.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        self._in_request = False
        self.deadline = 0.0
        self._enqueue(req)

    # -- serving ------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        self._queue.append(req)
        if len(self._queue) >= MAX_PIPELINED and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _refuse(self, error: NodeError) -> None:
        """Answer a request the server will not pass on (in order, after any being answered), then close."""
        self._broken = True
        self._in_request = False
        if self.transport is not None and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        req = Request("GET", b"", b"", [], "1.1", False)
        req.refusal = error
        self._enqueue(req)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        handler = self.server.handler
        while not self._closed:
            if not self._queue:
                if not self._keep_alive or self._broken:
                    self._close()
                    return
                self.deadline = self.server.clock + self.server.keep_alive_s
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            req = self._queue.popleft()
            if self._paused_reading and not self._broken and len(self._queue) < MAX_PIPELINED // 2:
                self._paused_reading = False
                self.transport.resume_reading()  # type: ignore[union-attr]
            self._keep_alive = self._keep_alive and req.keep_alive
            self._busy, self._complete, self._started, self._chunked = True, False, False, False
            self._head_only = req.method == "HEAD"
            try:
                if req.refusal is not None:
                    self._keep_alive = False
                    err = req.refusal
                    self.respond(err.status, [(b"content-type", b"application/json")], err.body())
                else:
                    await handler(req, self)
            except asyncio.CancelledError:
                if not self.gone:
                    raise
                return
            except Exception:
                log.exception("error answering %s %s", req.method, req.path[:200])
                if not self._started:
                    err = OperationFailed("internal error in the node; see its log")
                    self.respond(500, [(b"content-type", b"application/json")], err.body())
            finally:
                self._busy = False
            if not self._complete:
                self._close()  # a handler that began an answer and did not end it: the client must not wait
                return
            self._wake_done_waiters()

    def _close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    # -- answering (for handlers) -------------------------------------------------
    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
        parts = [STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(), self.server.date_header]
        for k, v in headers:
            parts += (k, b": ", v, b"\r\n")
        parts.append(framing)
        if not self._keep_alive or self.server.closing:
            self._keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        """The whole answer at once (content-length framing)."""
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self._started = self._complete = True
        if not self._closed:
            self.transport.write(head if self._head_only else head + body)  # type: ignore[union-attr]

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Begin an answer whose body follows in pieces (chunked; HTTP/1.0 clients get it until close)."""
        self._chunked = not self._head_only and self._parser.get_http_version() != "1.0"
        if not self._chunked and not self._head_only:
            self._keep_alive = False
        self._started = True
        head = self._head(status, headers, b"transfer-encoding: chunked\r\n" if self._chunked else b"")
        if not self._closed:
            self.transport.write(head)  # type: ignore[union-attr]

    async def write(self, data: bytes) -> None:
        """One piece of a started answer; waits while the client reads slower than we write."""
        if data and not self._closed and not self._head_only:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)  # type: ignore[union-attr]
        if self._paused_writing and not self._closed:
            if self._drain is None or self._drain.done():
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def end(self, data: bytes = b"") -> None:
        """The last piece of a started answer."""
        self._complete = True
        if self._closed or self._head_only:
            return
        if self._chunked:
            self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")  # type: ignore[union-attr]
        else:
            if data:
                self.transport.write(data)  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the connection (an answer that cannot be finished)."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def started(self) -> bool:
        return self._started

    async def until_done(self) -> None:
        """Wait until the current answer has ended or the client has gone (ASGI's http.disconnect)."""
        if self._closed or (self._complete and not self._busy):
            return
        fut = asyncio.get_running_loop().create_future()
        if self._done_waiters is None:
            self._done_waiters = []
        self._done_waiters.append(fut)
        await fut

    def _wake_done_waiters(self) -> None:
        waiters, self._done_waiters = self._done_waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    # -- timeouts (called by the server's tick) -----------------------------------
    def expire(self) -> None:
        if self._in_request:
            log.info("closing a connection from %s: its request did not arrive within %.0f s",
                     self.client, self.server.request_timeout_s)
            self._refuse(RequestTimeout(f"the request did not arrive within {self.server.request_timeout_s:.0f} s"))
            self.deadline = 0.0
        elif not self._busy and not self._queue:
            self._close()


class Server:
    """Serves a handler on a listening socket until closed."""

    def __init__(self, handler: Handler, *, max_body_bytes: int, request_timeout_s: float = 30.0,
                 keep_alive_s: float = 75.0) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s, self.keep_alive_s = request_timeout_s, keep_alive_s
        self.connections: set[Connection] = set()
        self.closing = False
        self.clock = time.monotonic()
        self.date_header = b""
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        self.clock = now = time.monotonic()
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        for conn in [c for c in self.connections if c.deadline and c.deadline < now]:
            conn.expire()
        if self._server is not None:
            self._ticker = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
        self._ticker = loop.call_later(TICK_S, self._tick)

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop listening, let answers in progress end (up to grace_s), then drop every connection."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while True:
            for conn in list(self.connections):
                if not conn._busy and not conn._queue:
                    conn._close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        self._server = None
        await asyncio.sleep(0)  # let connection_lost callbacks run

