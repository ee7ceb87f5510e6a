"""A small HTTP/1.1 keep-alive client for talking to workers, over asyncio streams.

The gateway's hot path spends most of its CPU in the HTTP client; a general client
(httpx) costs several times what forwarding one request needs. This one does only what
the gateway needs: POST/GET with a byte body, content-length or chunked responses,
keep-alive connections pooled per worker, and errors that say whether anything was
sent or received (so the gateway knows when a retry on another replica is safe).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024


class UpstreamFailure(Exception):
    """The worker could not be reached or broke the protocol."""


class ConnectFailed(UpstreamFailure):
    """No connection, or the request never got an answer's first byte: safe to retry elsewhere."""


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

    @classmethod
    def parse(cls, base_url: str) -> "Origin":
        u = urlsplit(base_url)
        tls = u.scheme == "https"
        port = u.port or (443 if tls else 80)
        host = u.hostname or "127.0.0.1"
        return cls(tls, host, port, u.path.rstrip("/"), (u.netloc or host).encode())


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.transport.abort()


class Response:
    """A worker's answer: status and headers read, body read by `read` or `chunks`."""

    def __init__(self, pool: "Pool", origin: Origin, conn: _Conn, status: int,
                 headers: list[tuple[bytes, bytes]], timeout: float) -> None:
        self._pool, self._origin, self._conn = pool, origin, conn
        self.status = status
        self.headers = headers
        self._timeout = timeout
        self._chunked = False
        self._length: int | None = None
        self._reusable = True
        for k, v in headers:
            if k == b"transfer-encoding" and b"chunked" in v.lower():
                self._chunked = True
            elif k == b"content-length":
                self._length = int(v)
            elif k == b"connection" and v.lower() == b"close":
                self._reusable = False
        if not self._chunked and self._length is None:
            self._reusable = False  # body ends at EOF
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([c async for c in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked framing removed), one piece per network read."""
        r = self._conn.reader
        try:
            if self._chunked:
                async for data in self._dechunk(r):
                    yield data
            elif self._length is not None:
                left = self._length
                while left:
                    async with asyncio.timeout(self._timeout):
                        data = await r.read(min(left, 1 << 16))
                    if not data:
                        raise BrokenResponse("the worker closed the connection before the body ended")
                    left -= len(data)
                    yield data
            else:
                while True:
                    async with asyncio.timeout(self._timeout):
                        data = await r.read(1 << 16)
                    if not data:
                        break
                    yield data
        except TimeoutError:
            raise TimedOut("the worker sent nothing for too long") from None
        except (ConnectionError, ValueError) as exc:
            raise BrokenResponse(f"the worker's response broke off ({type(exc).__name__})") from None
        self._done = True

    async def _dechunk(self, r: asyncio.StreamReader) -> AsyncIterator[bytes]:
        # Parse chunked framing over raw reads: one await per network read, not per chunk.
        buf = b""
        pos = 0
        need = -1  # bytes of chunk payload still to take; -1: expecting a size line
        while True:
            out = []
            while True:
                if need < 0:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                    if size == 0:
                        if buf.find(b"\r\n", eol + 2) < 0:  # the empty trailer line
                            break
                        if out:
                            yield b"".join(out)
                        return
                    pos, need = eol + 2, size
                avail = len(buf) - pos
                if avail <= 0:
                    break
                if avail < need + 2:
                    take = min(avail, need)
                    if take:
                        out.append(buf[pos:pos + take])
                        need -= take
                        pos += take
                    break
                out.append(buf[pos:pos + need])
                pos += need + 2
                need = -1
            if out:
                yield b"".join(out)
            buf = buf[pos:]
            pos = 0
            async with asyncio.timeout(self._timeout):
                data = await r.read(1 << 16)
            if not data:
                raise BrokenResponse("the worker closed the connection in the middle of its answer")
            buf = buf + data if buf else data

    def drain_timeout(self, seconds: float) -> None:
        """From now on, wait at most this long for more body bytes."""
        self._timeout = min(self._timeout, seconds)

    def close(self) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it."""
        conn, self._conn = self._conn, None  # type: ignore[assignment]
        if conn is None:
            return
        if self._done and self._reusable:
            self._pool._release(self._origin, conn)
        else:
            conn.close()


class Pool:
    """Keep-alive connections per origin; no limit on how many are open (the gateway bounds that)."""

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 600.0, max_idle: int = 256,
                 idle_expiry: float = 30.0) -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_idle, self.idle_expiry = max_idle, idle_expiry
        self._idle: dict[Origin, list[_Conn]] = {}
        self._origins: dict[str, Origin] = {}
        self._tls: ssl.SSLContext | None = None

    def origin(self, base_url: str) -> Origin:
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = Origin.parse(base_url)
        return o

    async def request(self, method: str, base_url: str, path: str, body: bytes = b"",
                      headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """Send a request to base_url + path; return once the status and headers arrived."""
        origin = self.origin(base_url)
        head = [f"{method} {origin.prefix}{path} HTTP/1.1\r\n".encode(), b"host: ", origin.host_header,
                b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n"]
        for k, v in headers:
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        head.append(b"\r\n")
        data = b"".join(head) + body
        while True:
            conn, reused = self._take(origin), True
            if conn is None:
                conn, reused = await self._connect(origin), False
            try:
                return await self._exchange(origin, conn, data)
            except ConnectFailed:
                conn.close()
                if not reused:
                    raise
                # A pooled connection the worker had already closed: try a fresh one.
            except BaseException:
                conn.close()
                raise

    async def _exchange(self, origin: Origin, conn: _Conn, data: bytes) -> Response:
        conn.writer.write(data)
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await conn.reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            raise TimedOut("the worker did not answer in time") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ConnectFailed("the worker closed the connection without answering") from None
            raise BrokenResponse("the worker's answer broke off in its headers") from None
        except ConnectionError as exc:
            raise ConnectFailed(f"the worker's connection failed ({type(exc).__name__})") from None
        except asyncio.LimitOverrunError:
            raise BrokenResponse("the worker's response headers are too large") from None
        lines = head[:-4].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise BrokenResponse(f"the worker sent a bad status line: {lines[0][:80]!r}") from None
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.append((k.strip().lower(), v.strip()))
        return Response(self, origin, conn, status, headers, self.read_timeout)

    def _take(self, origin: Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        loop = asyncio.get_running_loop()
        while idle:
            conn = idle.pop()
            if loop.time() - conn.idle_since < self.idle_expiry and not conn.reader.at_eof() \
                    and not conn.writer.transport.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Conn) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle or conn.reader.at_eof():
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    async def _connect(self, origin: Origin) -> _Conn:
        tls = None
        if origin.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(origin.host, origin.port, ssl=tls, limit=MAX_HEAD), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}") from None
        return _Conn(reader, writer)

    async def aclose(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
