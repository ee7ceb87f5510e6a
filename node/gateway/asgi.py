"""Serving an ASGI application (the FastAPI admin API) on the node's own HTTP server.

The request body has already been read whole by node/gateway/httpd.py (within its size and
time limits), so `receive` hands it over in one message and then waits for the end of
the answer or the client's disconnect. Responses are written as one content-length
answer when the app gives its body in one message, else chunked as it arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from node.errors import OperationFailed
from node.gateway.httpd import Connection, Request

log = logging.getLogger("infernode.asgi")

Scope = MutableMapping[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[Scope]], Callable[[Scope], Awaitable[None]]], Awaitable[None]]
_FRAMING = (b"content-length", b"transfer-encoding", b"connection")


async def serve_asgi(app: App, req: Request, conn: Connection, *, server: tuple[str, int] | None = None,
                     extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                     scheme: str = "http") -> None:
    """Run one request through an ASGI app, answering on conn."""
    scope = scope_for(req, conn, server, scheme)
    body_given = False
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    streaming = False
    finished = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await conn.until_done()
        return {"type": "http.disconnect"}

    async def send(message: Scope) -> None:
        nonlocal status, headers, streaming, finished
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            names = {k.lower() for k, _ in extra_headers}
            headers = [(k.lower(), v) for k, v in message.get("headers", ())
                       if k.lower() not in _FRAMING and k.lower() not in names] + list(extra_headers)
            return
        if kind != "http.response.body" or finished:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if not streaming:
            if not more:
                finished = True
                conn.respond(status, headers, body)
                return
            streaming = True
            conn.start(status, headers)
        if more:
            await conn.write(body)
        else:
            finished = True
            conn.end(body)

    try:
        await app(scope, receive, send)
    except Exception:
        log.exception("error in %s %s", req.method, scope["path"])
        if finished:
            return  # the app answered (e.g. Starlette's 500 page) and then re-raised
        if not conn.started:
            err = OperationFailed("internal error in the node; see its log")
            conn.respond(500, [(b"content-type", b"application/json")] + list(extra_headers), err.body())
            return
        conn.abort()
        return
    if streaming and not finished:
        conn.abort()  # the app stopped half way through its answer
    elif not finished and headers:
        conn.respond(status, headers)  # a start with no body message


def scope_for(req: Request, conn: Connection, server: tuple[str, int] | None, scheme: str = "http") -> dict[str, Any]:
    """An ASGI HTTP scope for a request (for apps served through node/gateway/asgi.py)."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": req.http_version,
        "method": req.method, "scheme": scheme, "path": unquote_to_bytes(req.path).decode("utf-8", "replace"),
        "raw_path": req.path, "query_string": req.query, "root_path": "", "headers": req.headers,
        "client": conn.client, "server": server, "state": {},
    }
