"""TLS connections from accept to the end of their handshake: counted against the caps, and on a deadline.

asyncio's (and uvloop's) `create_server(ssl=...)` makes the protocol only after the
handshake, so a client that opened connections and never sent a ClientHello held
descriptors and memory without counting against `max_connections` /
`max_connections_per_ip`. Here the listening socket is accepted from directly: each
connection is admitted by address the moment it is accepted (over a cap: closed at once),
its handshake runs through `loop.connect_accepted_socket` under
`[node] tls_handshake_timeout_s`, and node/gateway/httpd.py's `Connection` takes it over,
already counted, when the handshake is done.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from node.gateway.httpd import Connection

if TYPE_CHECKING:
    from node.gateway.listener import Server

log = logging.getLogger("infernode.httpd")

ACCEPT_BATCH = 128       # connections accepted per wake-up, so one flood cannot hold the loop
FD_PAUSE_S = 1.0         # out of descriptors: accepting pauses this long (as asyncio's own server does)


class TlsAcceptor:
    """Accepts on a listening socket, admits by address, and shakes hands on a deadline."""

    def __init__(self, server: Server, sock: socket.socket, ctx: ssl.SSLContext, timeout_s: float) -> None:
        self.server, self.sock, self.ctx, self.timeout_s = server, sock, ctx, timeout_s
        self.pending: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self.closed = False
        sock.setblocking(False)
        sock.listen(2048)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait instead of spinning on a ready socket
                log.warning("cannot accept a connection (%s); pausing accepts for %.0f s", exc, FD_PAUSE_S)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(FD_PAUSE_S, self._resume)
                return
            ip = addr[0] if isinstance(addr, tuple) else ""
            if not self.server.admission.enter(ip):
                conn.close()   # over a cap: nothing can be said in clear text to a TLS client
                continue
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as plain connections have
            task = self.loop.create_task(self._handshake(conn, ip))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _handshake(self, conn: socket.socket, ip: str) -> None:
        made: list[Connection] = []

        def protocol() -> Connection:
            made.append(Connection(self.server, counted=True))  # the admission passes to the connection
            return made[-1]

        handed = False
        try:
            await self.loop.connect_accepted_socket(protocol, conn, ssl=self.ctx,
                                                    ssl_handshake_timeout=self.timeout_s)
            handed = True
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.debug("TLS handshake from %s failed: %r", ip, exc)
        finally:
            if not handed:
                if made and made[0].transport is not None:
                    made[0].abort()   # it owns the count now; its connection_lost gives the place back
                else:
                    self.server.admission.leave(ip)
                    conn.close()

    def close(self) -> None:
        """Stop accepting (a certificate reload); handshakes in progress finish with the context they began with."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()

    def abort(self) -> None:
        """Stop accepting and cancel the handshakes in progress (their places given back): the node is stopping."""
        self.close()
        for task in list(self.pending):
            task.cancel()
