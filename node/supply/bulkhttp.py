"""A bare HTTP/1.1 GET for bulk bytes (model weights), on the standard library.

httpx parses each 64 KiB read through h11 in pure Python; on loopback that capped a
download at about 130 MB/s on the development VM, where `http.client.readinto` into a
reused buffer moved 650-900 MB/s. Metadata and manifests still go through httpx;
only the body of a blob comes this way. Handles what a blob download meets: redirects
(to a CDN; Authorization is dropped when the origin changes), https with the
certifi bundle (or SSL_CERT_FILE / SSL_CERT_DIR, as httpx reads them), proxies with
credentials (node.supply.proxies), and one timeout that is both the connect timeout
and the stall timeout. A plain-TCP body can be handed over as the socket itself, for
splice(2) straight into the blob file.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urljoin, urlsplit

import certifi

from node.supply.proxies import proxy_for

REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 10
USER_AGENT = "infernode-pull"


class TooManyRedirects(http.client.HTTPException):
    """More than MAX_REDIRECTS hops."""


class ProxyRefused(Exception):
    """The proxy answered the CONNECT with an error (407: credentials wrong or missing)."""


@dataclass
class BulkClient:
    """Opens GETs with a shared TLS context (built once, on the first https URL)."""

    timeout_s: float
    _ssl: ssl.SSLContext | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                # The same order as httpx, so metadata and blobs trust the same roots.
                if os.environ.get("SSL_CERT_FILE"):
                    self._ssl = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
                elif os.environ.get("SSL_CERT_DIR"):
                    self._ssl = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
                else:
                    self._ssl = ssl.create_default_context(cafile=certifi.where())
            return self._ssl

    def _connection(self, u: SplitResult) -> tuple[http.client.HTTPConnection, dict[str, str] | None]:
        """A connection for `u`; headers for an absolute-form request through a proxy, else None."""
        if u.scheme not in ("http", "https"):
            raise http.client.InvalidURL(f"unsupported URL scheme in {u.geturl()}")
        host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
        p = proxy_for(u.scheme, host, port)
        auth = {"proxy-authorization": p.authorization} if p is not None and p.authorization else {}
        if u.scheme == "https":
            if p is not None:  # TCP to the proxy, CONNECT, then TLS with the origin through it
                conn = http.client.HTTPSConnection(p.host, p.port, timeout=self.timeout_s, context=self._context())
                conn.set_tunnel(host, port, headers=auth)
                return conn, None
            return http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self._context()), None
        if p is not None:
            return http.client.HTTPConnection(p.host, p.port, timeout=self.timeout_s), auth
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s), None

    def get(self, url: str, headers: dict[str, str]) -> BulkResponse:
        """GET `url`, following redirects; the caller reads the body and closes it."""
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            u = urlsplit(url)
            conn, via_proxy = self._connection(u)
            target = url if via_proxy is not None else (u.path or "/") + (f"?{u.query}" if u.query else "")
            same_origin = u[:2] == origin
            h = {k: v for k, v in headers.items() if same_origin or k.lower() != "authorization"}
            h.setdefault("user-agent", USER_AGENT)
            h.update(via_proxy or {})
            try:
                conn.request("GET", target, headers=h)
                resp = conn.getresponse()
            except OSError as exc:
                conn.close()
                if str(exc).startswith("Tunnel connection failed"):  # http.client's words for a refused CONNECT
                    raise ProxyRefused(f"the proxy refused to connect to {u.hostname}: {str(exc).partition(': ')[2]}") from None
                raise
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

    def raw_body(self) -> tuple[int, bytes, int] | None:
        """A plain-TCP body of known length as (socket fd, bytes already buffered, bytes still
        on the socket); None for TLS, chunked or unsized bodies (read those with readinto).
        """
        sock, r = self.conn.sock, self.resp
        if sock is None or isinstance(sock, ssl.SSLSocket) or r.chunked or r.length is None:
            return None
        pre = b""
        if r.length:
            # Headers were read through a buffer that may already hold body bytes: take those
            # (peek returns all of them, or waits for the first bytes if it holds none).
            pre = r.read(len(r.fp.peek(1)[:r.length]))
        return sock.fileno(), pre, r.length or 0

    def readinto(self, buf: memoryview) -> int:
        """Bytes read into buf; 0 at the end of the body (or when the peer closed early)."""
        return self.resp.readinto(buf)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> BulkResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
