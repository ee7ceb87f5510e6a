"""A forward HTTP proxy on 127.0.0.1 that wants `Proxy-Authorization: Basic`, for the pull tests.

Speaks the two forms RFC 9110 gives a proxy: `CONNECT host:port` (section 9.3.6: answer
2xx, then relay bytes both ways, so TLS runs end to end through it) and an absolute-form
request line `GET http://host:port/path` (RFC 9112 section 3.2.2), which it forwards in
origin form with `Connection: close` so every request gets its own upstream connection.
Without the right credentials it answers 407 with `Proxy-Authenticate: Basic` (RFC 9110
section 11.7.1). Only loopback upstreams are reached. `seen` records what came through.
"""

from __future__ import annotations

import base64
import select
import socket
import socketserver
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class ProxySeen:
    method: str
    target: str
    authorized: bool


class FakeProxy(socketserver.ThreadingTCPServer):
    """Start with `start()`; `url(user, password)` is what HTTP(S)_PROXY is set to."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, user: str = "alice", password: str = "s3cr:t@pw") -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.user, self.password = user, password
        self.seen: list[ProxySeen] = []
        self._lock = threading.Lock()

    def url(self, user: str | None = None, password: str | None = None) -> str:
        from urllib.parse import quote
        u, p = user if user is not None else self.user, password if password is not None else self.password
        return f"http://{quote(u, safe='')}:{quote(p, safe='')}@127.0.0.1:{self.server_address[1]}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def expected(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def record(self, method: str, target: str, authorized: bool) -> None:
        with self._lock:
            self.seen.append(ProxySeen(method, target, authorized))

    def start(self) -> FakeProxy:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    socks = [a, b]
    try:
        while True:
            readable, _, _ = select.select(socks, [], [], 30)
            if not readable:
                return
            for s in readable:
                data = s.recv(256 * 1024)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except OSError:
        return


class _ProxyHandler(socketserver.BaseRequestHandler):
    server: FakeProxy

    def _head(self) -> bytes | None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.request.recv(65536)
            if not chunk or len(buf) > 65536:
                return None
            buf += chunk
        return buf

    def _answer(self, status: str, extra: str = "") -> None:
        self.request.sendall(f"HTTP/1.1 {status}\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n".encode())

    def handle(self) -> None:
        raw = self._head()
        if raw is None:
            return
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
        auth = next((v for k, v in headers if k.lower() == "proxy-authorization"), None)
        ok = auth == self.server.expected()
        self.server.record(method, target, ok)
        if not ok:
            self._answer("407 Proxy Authentication Required", 'proxy-authenticate: Basic realm="fake"\r\n')
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            path_line = None
        else:
            u = urlsplit(target)
            if u.scheme != "http" or not u.hostname:
                self._answer("400 Bad Request")
                return
            host, port = u.hostname, str(u.port or 80)
            path_line = f"{method} {u.path or '/'}{'?' + u.query if u.query else ''} {version}"
        if host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            self._answer("403 Forbidden")  # loopback only: tests never reach out
            return
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
        except OSError:
            self._answer("502 Bad Gateway")
            return
        with upstream:
            if path_line is None:
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.sendall(rest)
            else:
                keep = [f"{k}: {v}" for k, v in headers
                        if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")]
                upstream.sendall("\r\n".join([path_line, *keep, "connection: close", "", ""]).encode("latin-1") + rest)
            _relay(self.request, upstream)
