"""A bare HTTP/1.1 GET for bulk bytes (model weights), on the standard library.

httpx parses each 64 KiB read through h11 in pure Python; on loopback that capped a
download at about 130 MB/s on the development VM, where `http.client.readinto` into a
reused buffer moved 650-900 MB/s. Metadata and manifests still go through httpx;
only the body of a blob comes this way. Handles what a blob download meets: redirects
(to a CDN; Authorization is dropped when the origin changes), https with the
certifi bundle (or SSL_CERT_FILE), HTTP(S)_PROXY / NO_PROXY, and one timeout that is
both the connect timeout and the stall timeout.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

import certifi

REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 10
USER_AGENT = "infernode-pull"


class TooManyRedirects(http.client.HTTPException):
    """More than MAX_REDIRECTS hops."""


@dataclass
class BulkClient:
    """Opens GETs with a shared TLS context (built once, on the first https URL)."""

    timeout_s: float
    _ssl: ssl.SSLContext | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                cafile = os.environ.get("SSL_CERT_FILE")
                if not cafile:  # httpx's own CA bundle (certifi), so both paths trust the same roots
                    cafile = certifi.where()
                self._ssl = ssl.create_default_context(cafile=cafile)
            return self._ssl

    def _connection(self, u: SplitResult) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for `u`, and whether the request line needs the absolute URL."""
        host, port = u.hostname or "", u.port
        proxy = None if proxy_bypass(host) else getproxies().get(u.scheme)
        p = urlsplit(proxy) if proxy else None
        if u.scheme == "https":
            if p is not None:
                conn = http.client.HTTPSConnection(p.hostname or "", p.port or 80, timeout=self.timeout_s,
                                                   context=self._context())
                conn.set_tunnel(host, port or 443)
                return conn, False
            return http.client.HTTPSConnection(host, port or 443, timeout=self.timeout_s, context=self._context()), False
        if u.scheme == "http":
            if p is not None:
                return http.client.HTTPConnection(p.hostname or "", p.port or 80, timeout=self.timeout_s), True
            return http.client.HTTPConnection(host, port or 80, timeout=self.timeout_s), False
        raise http.client.InvalidURL(f"unsupported URL scheme in {u.geturl()}")

    def get(self, url: str, headers: dict[str, str]) -> BulkResponse:
        """GET `url`, following redirects; the caller reads the body and closes it."""
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            u = urlsplit(url)
            conn, absolute = self._connection(u)
            target = url if absolute else (u.path or "/") + (f"?{u.query}" if u.query else "")
            same_origin = u[:2] == origin
            h = {k: v for k, v in headers.items() if same_origin or k.lower() != "authorization"}
            h.setdefault("user-agent", USER_AGENT)
            try:
                conn.request("GET", target, headers=h)
                resp = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            location = resp.getheader("location")
            if resp.status in REDIRECTS and location:
                conn.close()
                url = urljoin(url, location)
                continue
            return BulkResponse(conn, resp, url)
        raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects from {url}")


@dataclass
class BulkResponse:
    """A response whose body is read with `readinto`; close it when done."""

    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    url: str

    @property
    def status(self) -> int:
        return self.resp.status

    def header(self, name: str) -> str | None:
        return self.resp.getheader(name)

    def readinto(self, buf: memoryview) -> int:
        """Bytes read into buf; 0 at the end of the body (or when the peer closed early)."""
        return self.resp.readinto(buf)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> BulkResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
