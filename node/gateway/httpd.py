"""The node's HTTP/1.1 server: one task per connection answers its requests in order.

The `/v1` gateway must add well under a millisecond per request, so the node serves its
port itself: node/gateway/reader.py turns bytes into requests (llhttp via httptools),
each answer is written with a single `write`, and everything that is not `/v1` goes
through node/gateway/asgi.py. The port faces untrusted clients (docs/security.md):
a `head_check` (authentication) runs before any body is read and its refusal closes
the connection; answers wait while a client does not read them, and a client that
reads nothing for `write_stall_s` is dropped; connections past the caps get a 503.
A client that goes away before its answer ended cancels the task serving it, with
`conn.gone` set so the handler can tell that from a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from node.errors import OperationFailed, RequestTimeout
from node.gateway.limits import delivery
from node.gateway.reader import MAX_HEAD_BYTES, RequestReader
from node.gateway.request import Handler, HeadCheck, Refusal, Request

__all__ = ["MAX_HEAD_BYTES", "Connection", "Handler", "HeadCheck", "Refusal", "Request"]

if TYPE_CHECKING:
    from node.gateway.listener import Server

log = logging.getLogger("infernode.httpd")

MAX_PIPELINED = 8          # requests parsed ahead of the one being answered before parsing stops
LINGER_S = 2.0             # after a refusal, how long the unread rest of a request is read and dropped
LINGER_BYTES = 1 << 20
STATUS_LINES = {v: {int(s): f"HTTP/{v} {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus} for v in ("1.1", "1.0")}


class Connection(asyncio.Protocol):
    """One client connection: parses requests, queues them, and is what handlers answer through."""

    def __init__(self, server: Server, counted: bool = False) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.gone = False            # the client went away before the current answer ended
        self.deadline = 0.0          # server clock time by which something must happen; 0: none
        self._queue: deque[Request] = deque()
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._paused_reading = False
        self._closed = False
        self._counted = counted      # counted in the server's admission (TLS: from accept, by its handshake)
        self._broken = False         # the parser gave up; nothing more is parsed
        self._lingering = False      # refused: the rest of the request is read and dropped until close
        self._linger_bytes = 0
        self._busy = False           # a handler is answering
        self._complete = True        # the current answer has been written whole
        self._started = False        # the current answer's head has been written
        self._chunked = False
        self._head_only = False
        self._version = "1.1"        # the HTTP version of the request being answered
        self._keep_alive = True
        self._done_waiters: list[asyncio.Future[None]] | None = None
        # Headers the dispatcher puts on this one answer, replacing the handler's of the same names
        # (the console's security headers on the API answers it forwards); reset per request.
        self.override_headers: list[tuple[bytes, bytes]] | None = None
        self.reader = RequestReader(self)
        self._sock: Any = None
        self._acked = -1             # the client's acknowledged bytes when last looked
        self._stall_since = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        server = self.server
        if not self._counted and not server.admission.enter(self.client[0] if self.client else ""):
            # Cheap: nothing parsed, one prepared write, closed. (A client that already sent a
            # request may see a reset instead: the kernel resets a close with unread data.)
            transport.write(server.busy_answer)  # type: ignore[attr-defined]
            transport.close()
            self._closed = True
            return
        self._counted = True
        sock = self._sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deadline = server.clock + server.limits.request_timeout_s
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._counted:
            self._counted = False
            self.server.admission.leave(self.client[0] if self.client else "")
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
        self._pause_reading()  # no more requests from a client that is not reading its answers

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._maybe_resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self.abort()
            return
        if self._broken or self._closed:
            return
        reader = self.reader
        if reader.unfed:
            data = reader.unfed + data
            reader.unfed = b""
        reader.feed(data)

    def _must_wait(self) -> bool:
        return (len(self._queue) >= MAX_PIPELINED or self._queued_bytes > self.server.limits.max_body_bytes
                or self._paused_writing)

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None and not self._closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if not self._paused_reading or self._broken or self._closed or self._must_wait():
            return
        if len(self._queue) >= MAX_PIPELINED // 2:
            return
        self._paused_reading = False
        if self.reader.unfed:
            data, self.reader.unfed = self.reader.unfed, b""
            self.reader.feed(data)
        if not self._paused_reading and not self._broken:
            self.transport.resume_reading()  # type: ignore[union-attr]
        elif self._broken:
            self._paused_reading = True

    # -- serving ------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        self._queue.append(req)
        self._queued_bytes += len(req.body)
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _refuse(self, refusal: Refusal, req: Request | None = None) -> None:
        """Answer a request the server will not pass on (in order, after any being answered), then close."""
        self._broken = True
        self.reader.in_request = False
        self.reader.unfed = b""
        self._pause_reading()
        if req is None:
            req = Request("GET", b"", b"", [], "1.1", False)
        req.keep_alive = False
        req.refusal = refusal
        self._enqueue(req)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        handler = self.server.handler
        while not self._closed:
            if not self._queue:
                if not self._keep_alive or self._broken:
                    self._close()
                    return
                self.deadline = self.server.clock + self.server.limits.keep_alive_s
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            req = self._queue.popleft()
            self._queued_bytes -= len(req.body)
            self._keep_alive = self._keep_alive and req.keep_alive
            self._busy, self._complete, self._started, self._chunked = True, False, False, False
            self.override_headers = None
            self._head_only = req.method == "HEAD"
            self._version = "1.0" if req.http_version == "1.0" else "1.1"
            try:
                if req.refusal is not None:
                    self._keep_alive = False
                    self.respond(*req.refusal)
                    self._linger()
                    return
                await handler(req, self)
            except asyncio.CancelledError:
                if not self.gone:
                    raise
                return
            except Exception:
                log.exception("error answering %s %s", req.method, req.path[:200])
                if not self._started:
                    self.respond(*Refusal.of(OperationFailed("internal error in the node; see its log")))
            finally:
                self._busy = False
            if not self._complete:
                self._close()  # a handler that began an answer and did not end it: the client must not wait
                return
            self._wake_done_waiters()
            if self._paused_writing and not self._closed:
                await self._wait_drain()  # the next answer waits until the client reads this one
            self._maybe_resume_reading()

    def _linger(self) -> None:
        """Close after a refusal, reading and dropping what the client still sends for a moment, so
        that it can read the answer instead of a reset."""
        if self._closed or self.transport is None:
            return
        if not self.transport.can_write_eof():
            self._close()
            return
        self.transport.write_eof()
        self._lingering = True
        self.deadline = self.server.clock + LINGER_S
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    async def _wait_drain(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    # -- answering (for handlers) -------------------------------------------------
    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
        lines = STATUS_LINES[self._version]
        parts = [lines.get(status) or f"HTTP/{self._version} {status} Unknown\r\n".encode(), self.server.date_header]
        if self.override_headers is not None:
            names = {k for k, _ in self.override_headers}
            headers = [h for h in headers if h[0].lower() not in names] + self.override_headers
        for k, v in headers:
            parts += (k, b": ", v, b"\r\n")
            if k == b"x-request-id":  # the anthropic SDK reads `request-id` (message._request_id)
                parts += (b"request-id: ", v, b"\r\n")
        parts.append(framing)
        if not self._keep_alive or self.server.closing:
            self._keep_alive = False
            parts.append(b"connection: close\r\n")
        elif self._version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
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
        self._chunked = not self._head_only and self._version != "1.0"
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
            await self._wait_drain()

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
        if self._lingering:
            self.abort()
        elif self.reader.in_request:
            timeout = self.server.limits.request_timeout_s
            log.info("closing a connection from %s: its request did not arrive within %.0f s", self.client, timeout)
            self._refuse(Refusal.of(RequestTimeout(f"the request did not arrive within {timeout:.0f} s")), self.reader.req)
            self.deadline = 0.0
        elif not self._busy and not self._queue:
            self._close()

    def stalled(self, now: float) -> bool:
        """Whether the client has read nothing of what is waiting for it for write_stall_s."""
        pending = self._paused_writing or self._busy or bool(self._queue)
        seen = delivery(self._sock) if pending else None
        if seen is None or (seen[1] == 0 and not self._paused_writing):
            self._stall_since = 0.0
            return False
        if seen[0] != self._acked or not self._stall_since:
            self._acked, self._stall_since = seen[0], now
            return False
        return now - self._stall_since >= self.server.limits.write_stall_s
