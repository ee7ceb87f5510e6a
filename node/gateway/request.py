"""A request as the node's HTTP server hands it over, and an answer the server gives instead."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from node.errors import NodeError

if TYPE_CHECKING:
    from node.gateway.httpd import Connection

JSON = [(b"content-type", b"application/json")]


class Refusal(NamedTuple):
    """An answer the server gives instead of passing a request on."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @classmethod
    def of(cls, err: NodeError) -> Refusal:
        """The answer of an error found before the request was handed on (it gets a request id of its own)."""
        headers = JSON + [(b"x-request-id", uuid.uuid4().hex.encode())]
        headers += [(k.encode(), v.encode()) for k, v in err.headers.items()]
        if not err.retryable:
            headers.append((b"x-should-retry", b"false"))
        return cls(err.status, headers, err.body())


class Request:
    """One parsed request: method, raw path and query, headers (lowercased names) and the whole body."""

    __slots__ = (
        "auth",
        "body",
        "body_limit",
        "client",
        "headers",
        "http_version",
        "keep_alive",
        "lane",
        "method",
        "preempt",
        "path",
        "query",
        "refusal",
    )

    def __init__(self, method: str, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
                 http_version: str, keep_alive: bool) -> None:
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.http_version, self.keep_alive = http_version, keep_alive
        self.body = b""
        self.refusal: Refusal | None = None  # set when the server answers this request itself
        self.auth: Any = None                # what the head check established (e.g. the API key's record)
        self.body_limit = 0                  # set from the server's max_body_bytes; a head check may lower it
        self.client = ""                     # the client's address (for pacing failed authentication)
        self.lane: str | None = None         # "batch" for the node's own batch lines (node/gateway/inprocess.py)
        self.preempt: Any = None             # a batch line's: stops it so an interactive request runs alone

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


Handler = Callable[[Request, "Connection"], Awaitable[None]]
HeadCheck = Callable[[Request], "Refusal | None"]
