"""The node's one HTTP port: a small ASGI dispatcher in front of three apps.

`/v1/*` goes to the bare-ASGI gateway (the hot path); `/healthz`, `/readyz` and
`/metrics` are answered here; `/admin/*` goes to the FastAPI admin app.
"""

from __future__ import annotations

import asyncio
import json
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
        if path.startswith("/v1/"):
            gateway = self.node.gateway
            if gateway is None:
                err = NoReadyReplica("the node is starting", retry_after=2)
                return await send_body(send, err.status, err.body(), error_headers(err, b"-"))
            return await gateway(scope, receive, send)
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
        await send_body(send, 404, err.body(), error_headers(err, b"-"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg: dict[str, Any] = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
