"""A loopback HTTP server base for the Hub and registry fakes: blobs with Range, and faults.

Range handling follows RFC 9110 section 14 (`Range: bytes=N-` or `bytes=N-M` -> 206 with
`Content-Range: bytes N-M/TOTAL`, an end past the last byte meaning the last byte; an
unsatisfiable start -> 416). `served` counts the body bytes sent per blob, so tests can
say what a resume fetched again. Faults are how real
downloads go wrong: a connection dropped mid-file, a corrupt byte, a wrong size, 5xx
answers, a stall, a server that ignores Range, and a slow link.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """Per-blob misbehaviour, keyed by the blob's sha256 hex."""

    drop_after: dict[str, int] = field(default_factory=dict)   # close after N body bytes, once
    corrupt: set[str] = field(default_factory=set)              # flip one byte, every time
    extra_bytes: dict[str, int] = field(default_factory=dict)   # serve N more bytes than the blob
    errors_5xx: dict[str, int] = field(default_factory=dict)    # answer 503 this many times first
    stall_s: dict[str, float] = field(default_factory=dict)     # stop sending mid-body this long, once
    ignore_range: bool = False                                  # answer 200 with the whole body
    rate_bps: int | None = None                                 # throttle every body (bytes/s)


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FaultyServer(ThreadingHTTPServer):
    """A threading HTTP server on 127.0.0.1 that records requests and injects `faults`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.faults = Faults()
        self.seen: list[Seen] = []
        self.served: dict[str, int] = {}  # body bytes written to clients, per blob key
        self.sending = self.peak_sending = 0  # blob bodies being sent now, and the most at once
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.tls: ssl.SSLContext | None = None

    def use_tls(self, context: ssl.SSLContext) -> FaultyServer:
        """Serve https with this server-side context (the handshake runs on each request's thread)."""
        self.tls = context
        return self

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # a client that does not trust us hangs up: nothing to serve
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FaultyServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def record(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.seen.append(Seen(h.command, h.path, h.headers.get("range"), h.headers.get("authorization")))

    def sending_body(self, delta: int) -> None:
        with self._lock:
            self.sending += delta
            self.peak_sending = max(self.peak_sending, self.sending)

    def count(self, key: str, n: int) -> None:
        with self._lock:
            self.served[key] = self.served.get(key, 0) + n

    def take(self, table: dict, key: str) -> object:
        """Pop a one-shot fault (or decrement a counted one) atomically."""
        with self._lock:
            v = table.get(key)
            if v is None:
                return None
            if isinstance(v, int) and table is self.faults.errors_5xx:
                if v <= 0:
                    return None
                table[key] = v - 1
                return v
            del table[key]
            return v


class FaultyHandler(BaseHTTPRequestHandler):
    """Base handler: `send_blob` serves bytes with Range and the server's faults."""

    server: FaultyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def send_json(self, code: int, body: bytes, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_blob(self, key: str, data: bytes, headers: dict[str, str] | None = None,
                  content_type: str = "application/octet-stream") -> None:
        f = self.server.faults
        if self.server.take(f.errors_5xx, key):
            self.send_json(503, b'{"error":"try again"}')
            return
        if key in f.corrupt and data:
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        if key in f.extra_bytes:
            data = data + b"\0" * f.extra_bytes[key]
        total, start, end = len(data), 0, len(data)
        m = RANGE.match(self.headers.get("range") or "")
        if m and not f.ignore_range:
            start = int(m.group(1))
            end = min(total, int(m.group(2)) + 1) if m.group(2) else total
            if start >= total or end <= start:
                self.send_response(416)
                self.send_header("content-range", f"bytes */{total}")
                self.send_header("content-length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("content-range", f"bytes {start}-{end - 1}/{total}")
        else:
            self.send_response(200)
        if not f.ignore_range:
            self.send_header("accept-ranges", "bytes")
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(end - start))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        self.server.sending_body(1)
        try:
            self._send_body(key, memoryview(data)[start:end])
        finally:
            self.server.sending_body(-1)

    def _send_body(self, key: str, body: memoryview) -> None:
        f = self.server.faults
        drop = self.server.take(f.drop_after, key)
        stall = self.server.take(f.stall_s, key)
        if drop is not None:
            self.wfile.write(body[:int(drop)])  # type: ignore[call-overload]
            self.wfile.flush()
            self.server.count(key, len(body[:int(drop)]))  # type: ignore[call-overload]
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # a reset mid-file, as a flaky link does
            return
        if stall is not None:
            half = len(body) // 2
            self.wfile.write(body[:half])
            self.wfile.flush()
            self.server.count(key, half)
            time.sleep(float(stall))  # type: ignore[arg-type]
            body = body[half:]
        step = 64 * 1024
        for i in range(0, len(body), step):
            if f.rate_bps:  # before the write: the body is over when its last byte is sent
                time.sleep(len(body[i:i + step]) / f.rate_bps)
            try:
                self.wfile.write(body[i:i + step])
            except (BrokenPipeError, ConnectionResetError):
                return
            self.server.count(key, len(body[i:i + step]))
