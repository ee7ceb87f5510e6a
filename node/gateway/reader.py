"""Bytes in, requests out: llhttp (httptools) driven so that no client can make it hold much.

httptools joins the pieces of a header (and of a URL, and of a trailer) with `bytes +=`,
so a head that never ends costs quadratic time unless it is cut short: the reader
counts head bytes as they are fed (431 past MAX_HEAD_BYTES), counts bytes after the
head that bring no body (trailers, chunk framing) the same way, and feeds at most up
to the next blank line at a time, so that at most one request completes per piece and
parsing stops, keeping the rest unparsed, while enough requests wait.
Trailers are parsed and dropped: they never become request headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from node.errors import BodyTooLarge, HeadersTooLarge, InvalidRequest
from node.gateway.request import Refusal, Request

if TYPE_CHECKING:
    from node.gateway.httpd import Connection

MAX_HEAD_BYTES = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refuse(Exception):
    def __init__(self, refusal: Refusal, req: Request | None = None) -> None:
        self.refusal, self.req = refusal, req


class RequestReader:
    """Parses one connection's bytes into Requests, handed to the connection as they complete."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.limits = conn.server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.unfed = b""            # received but not parsed while requests wait
        self.req: Request | None = None
        self.in_request = False
        self.heads = 0              # heads completed on this connection
        self.done = 0               # requests completed on this connection
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = True        # between requests or inside a head: bytes fed are head bytes
        self._head_fed = 0
        self._idle_fed = 0          # bytes fed after the head that brought no body (trailers, framing)
        self._body: list[bytes] = []
        self._body_size = 0

    def feed(self, data: bytes) -> None:
        """Parse data, a piece at a time, while requests may be queued; keep the rest unparsed."""
        pos, end_all = 0, len(data)
        while pos < end_all and not self.conn._broken:
            if self.conn._must_wait():
                self.unfed = data[pos:]
                self.conn._pause_reading()
                return
            # A piece ends after a blank line: at most one head completes in it, so the
            # queue is looked at between requests even within one read.
            end = data.find(b"\r\n\r\n", pos)
            end = end_all if end < 0 else end + 4
            in_head = self._in_head
            if in_head:
                end = min(end, pos + MAX_HEAD_BYTES - self._head_fed)
            body_before, heads_before, done_before = self._body_size, self.heads, self.done
            piece = data if pos == 0 and end == end_all else data[pos:end]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # An Upgrade (h2c, websocket) the node does not speak, without a body: the
                # request is answered over HTTP/1.1 and the connection closed, as RFC 9110 allows.
                self.conn._broken = True
                self.conn._keep_alive = False
                return
            except httptools.HttpParserCallbackError as exc:
                err = exc.__context__
                if isinstance(err, _Refuse):
                    self.conn._refuse(err.refusal, err.req)
                else:
                    self.conn._refuse(Refusal.of(InvalidRequest("malformed HTTP request")))
                return
            except httptools.HttpParserError as exc:
                self.conn._refuse(Refusal.of(InvalidRequest(f"malformed HTTP request: {exc}")))
                return
            fed = end - pos
            pos = end
            if self.heads != heads_before or self.done != done_before:
                self._idle_fed = 0  # a head or a request completed in this piece: its bytes were theirs
            elif in_head:
                self._head_fed += fed
                if self._head_fed >= MAX_HEAD_BYTES:
                    too_large = HeadersTooLarge(f"the request's head exceeds {MAX_HEAD_BYTES} bytes")
                    self.conn._refuse(Refusal.of(too_large), self.req)
            elif self.in_request and self._body_size == body_before:
                # No body progress: chunk framing or trailers, which httptools also joins with +=.
                self._idle_fed += fed
                if self._idle_fed > MAX_HEAD_BYTES:
                    too_large = HeadersTooLarge(f"the request's trailers exceed {MAX_HEAD_BYTES} bytes")
                    self.conn._refuse(Refusal.of(too_large), self.req)
            elif self._body_size != body_before:
                self._idle_fed = 0

    # -- httptools callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._body_size = b"", [], [], 0
        self.req = None
        self.in_request = True
        self.conn.deadline = self.conn.server.clock + self.limits.request_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never a request header
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head, self._head_fed, self._idle_fed = False, 0, 0
        self.heads += 1
        p = self.parser
        path, _, query = self._url.partition(b"?")
        req = self.req = Request(p.get_method().decode("ascii"), path, query, self._headers,
                                 p.get_http_version(), p.should_keep_alive())
        req.body_limit = self.limits.max_body_bytes
        client = self.conn.client
        req.client = client[0] if client else ""
        length = -1
        expect_continue = has_body = upgrade = False
        for k, v in self._headers:
            if k == b"content-length":
                length = int(v) if v.isdigit() else -1
                has_body = has_body or length != 0
            elif k == b"transfer-encoding":
                has_body = True
            elif k == b"expect" and v.lower() == b"100-continue":
                expect_continue = True
            elif k == b"upgrade":
                upgrade = True
        if upgrade and has_body:
            raise _Refuse(Refusal.of(InvalidRequest("a request with Upgrade cannot carry a body; this server "
                                                    "does not switch protocols")), req)
        check = self.conn.server.head_check
        if check is not None:
            refusal = check(req)
            if refusal is not None:
                raise _Refuse(refusal, req)
        if length > req.body_limit:
            raise _Refuse(Refusal.of(BodyTooLarge(f"request body is {length} bytes; the limit is {req.body_limit}")),
                          req)
        if expect_continue and self.conn.transport is not None and not self.conn._queue and not self.conn._busy:
            self.conn.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        limit = self.req.body_limit if self.req is not None else self.limits.max_body_bytes
        if self._body_size > limit:
            raise _Refuse(Refusal.of(BodyTooLarge(f"request body exceeds the limit of {limit} bytes")), self.req)
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        req.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        self.in_request = False
        self._in_head, self._head_fed = True, 0
        self.done += 1
        self.conn.deadline = 0.0
        self.conn._enqueue(req)
