"""The node's one HTTP port: a small ASGI dispatcher in front of three apps.

`/v1/*` goes to the bare-ASGI gateway (the hot path); `/healthz`, `/readyz` and
`/metrics` are answered here; `/admin/*` goes to the FastAPI admin app.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from node.admin_api import build_admin
from node.app import Node
from node.errors import NodeError, NotFound, NoReadyReplica
from node.gateway import JSON_CT, Receive, Scope, Send, error_headers, send_body


class NodeApp:
    """The ASGI application served by `infernode up`."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.admin = build_admin(node)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if kind != "http":
            return
        path: str = scope["path"]
        gateway = self.node.gateway
        if path.startswith("/v1/") and gateway is not None:
            return await gateway(scope, receive, send)  # the hot path sets its own x-request-id
        rid = _request_id(scope)
        send = _with_request_id(send, rid)
        if path.startswith("/v1/"):
            err = NoReadyReplica("the node is starting", retry_after=2)
            return await send_body(send, err.status, err.body(), error_headers(err, rid))
        if path == "/healthz":
            return await send_body(send, 200, b'{"status":"ok"}', JSON_CT)
        if path == "/readyz":
            ok, reasons = self.node.readiness()
            body = json.dumps({"status": "ready" if ok else "not ready", "reasons": reasons}).encode()
            return await send_body(send, 200 if ok else 503, body, JSON_CT)
        if path == "/metrics":
            # Rendering a box's worth of worker families takes a while: keep it off the event loop.
            return await send_body(send, 200, await asyncio.to_thread(self.node.metrics.render),
                                   [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
        if path.startswith("/admin/"):
            return await self.admin(scope, receive, send)
        err: NodeError = NotFound(f"no route {scope['method']} {path}")
        await send_body(send, 404, err.body(), JSON_CT)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg: dict[str, Any] = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def _request_id(scope: Scope) -> bytes:
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            return v[:128]
    return uuid.uuid4().hex.encode()


def _with_request_id(send: Send, rid: bytes) -> Send:
    """`send`, adding x-request-id to the response headers (every response carries one)."""
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
            message = {**message, "headers": headers + [(b"x-request-id", rid)]}
        await send(message)
    return wrapped
