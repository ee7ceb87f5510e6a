"""The node's listening socket: accepts connections for node/gateway/httpd.py, ticks their timers, swaps TLS.

Once a second the tick renews the Date header, expires connections past their
deadline (request_timeout_s, keep_alive_s) and drops those whose client has read
nothing for write_stall_s. Connections past `max_connections` or
`max_connections_per_ip` get a prepared 503 and are closed (node/gateway/limits.py);
a TLS connection counts from accept and has `handshake_timeout_s` to finish its
handshake (node/gateway/handshake.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from email.utils import formatdate

from node.errors import NoReadyReplica
from node.gateway.handshake import TlsAcceptor
from node.gateway.httpd import Connection
from node.gateway.limits import Admission, Limits
from node.gateway.request import Handler, HeadCheck

log = logging.getLogger("infernode.httpd")

TICK_S = 1.0   # timeouts are checked, and the Date header renewed, once a second


class Server:
    """Serves a handler on a listening socket until closed."""

    def __init__(self, handler: Handler, *, max_body_bytes: int, request_timeout_s: float = 30.0,
                 keep_alive_s: float = 75.0, write_stall_s: float = 60.0, max_connections: int = 4096,
                 max_connections_per_ip: int = 256, head_check: HeadCheck | None = None,
                 handshake_timeout_s: float = 10.0) -> None:
        self.handler = handler
        self.head_check = head_check
        self.limits = Limits(max_body_bytes, request_timeout_s, keep_alive_s, write_stall_s, max_connections,
                             max_connections_per_ip)
        self.admission = Admission(max_connections, max_connections_per_ip)
        err = NoReadyReplica("the node has too many connections; retry later", retry_after=1)
        body = err.body()
        self.busy_answer = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        self.connections: set[Connection] = set()
        self.handshake_timeout_s = handshake_timeout_s
        self.closing = False
        self.clock = time.monotonic()
        self.date_header = b""
        self.tls: ssl.SSLContext | None = None
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | TlsAcceptor | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        self.clock = now = time.monotonic()
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        for conn in [c for c in self.connections if c.deadline and c.deadline < now]:
            conn.expire()
        for conn in [c for c in self.connections if c.stalled(now)]:
            log.info("dropping a connection from %s: it read nothing for %.0f s", conn.client,
                     self.limits.write_stall_s)
            conn.abort()
        if self._server is not None:
            self._ticker = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Listen on sock (with TLS when a context is given)."""
        self._sock = sock
        self._server = await self._listen(tls)
        self._ticker = asyncio.get_running_loop().call_later(TICK_S, self._tick)

    async def _listen(self, tls: ssl.SSLContext | None) -> asyncio.AbstractServer | TlsAcceptor:
        assert self._sock is not None
        self.tls = tls
        loop = asyncio.get_running_loop()
        # Each listener gets its own descriptor of the one socket, so a TLS reload can swap
        # listeners while connections keep queueing on the socket.
        if tls is not None:
            return TlsAcceptor(self, self._sock.dup(), tls, self.handshake_timeout_s)
        return await loop.create_server(lambda: Connection(self), sock=self._sock.dup(), backlog=2048)

    async def set_tls(self, tls: ssl.SSLContext | None) -> None:
        """Serve new connections with another TLS context (certificate reload); open ones keep theirs."""
        old = self._server
        self._server = await self._listen(tls)
        if old is not None:
            old.close()

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop listening, let answers in progress end (up to grace_s), then drop every connection."""
        self.closing = True
        if isinstance(self._server, TlsAcceptor):
            self._server.abort()
        elif self._server is not None:
            self._server.close()
        if self._sock is not None:
            self._sock.close()
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
