"""The node's one HTTP port: what each path is answered by.

`/v1/*` goes to the gateway (the hot path, node/gateway/proxy.py), and so do the paths of the
other client APIs it translates (API_ROUTES: Anthropic's Messages, OpenAI's Responses,
Ollama's API, each a Route of node/gateway/adapter.py); `/healthz`, `/readyz` and
`/metrics` are answered here; `/admin/*` goes to the FastAPI admin app through the
ASGI bridge; `/ui/*` is the web console, whose API calls come back here as `/v1` or
`/admin` requests carrying the signed-in principal's secret. Every response carries an
`x-request-id` (the client's if it sent one).
"""

from __future__ import annotations

import asyncio
import json
import uuid

from node.admin.routes import build_admin
from node.app import Node
<<<<<<< HEAD
from node.console.web import Answer, Console
=======
from node.gateway import anthropic, ollama, responses
from node.gateway.adapter import Route
>>>>>>> main
from node.gateway.asgi import serve_asgi
from node.errors import NodeError, NotFound, NoReadyReplica
from node.gateway.proxy import JSON_CT, error_headers
from node.gateway.httpd import Connection, Request

API_ROUTES: dict[bytes, Route] = {**anthropic.ROUTES, **responses.ROUTES, **ollama.ROUTES}
METRICS_CT = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]


class NodeApp:
    """The request handler `infernode up` serves (node/gateway/httpd.py calls it for every request)."""

    def __init__(self, node: Node, server_addr: tuple[str, int] | None = None) -> None:
        self.node = node
        self.admin = build_admin(node)
        self.server_addr = server_addr
        self.console = Console(node.identify, secure=bool(getattr(node.config.node, "tls_cert", None)), node_name=node.config.node.name)

    async def __call__(self, req: Request, conn: Connection) -> None:
        path = req.path
        if path == b"/ui" or path.startswith(b"/ui/"):
            ui = self.console.handle(req.method, path.decode("latin-1"), req.headers, req.body)
            if isinstance(ui, Answer):
                return conn.respond(ui.status, ui.headers + [(b"x-request-id", _request_id(req))], ui.body)
            req.path, req.headers = ui.path, ui.headers
            path = req.path
        gateway = self.node.gateway
        route = API_ROUTES.get(path)
        if (route is not None or path.startswith(b"/v1/")) and gateway is not None:
            return await gateway.handle(req, conn, route)  # the hot path sets its own x-request-id
        rid = _request_id(req)
        if route is not None or path.startswith(b"/v1/"):
            err: NodeError = NoReadyReplica("the node is starting", retry_after=2)
            if route is not None:
                status, body = route.error(err, rid.decode("latin-1"))
                return conn.respond(status, error_headers(err, rid), body)
            return conn.respond(err.status, error_headers(err, rid), err.body())
        ridh = [(b"x-request-id", rid)]
        if path == b"/healthz":
            return conn.respond(200, JSON_CT + ridh, b'{"status":"ok"}')
        if path == b"/readyz":
            ok, reasons = self.node.readiness()
            body = json.dumps({"status": "ready" if ok else "not ready", "reasons": reasons}).encode()
            return conn.respond(200 if ok else 503, JSON_CT + ridh, body)
        if path == b"/metrics":
            # Rendering a box's worth of worker families takes a while: keep it off the event loop.
            return conn.respond(200, METRICS_CT + ridh, await asyncio.to_thread(self.node.metrics.render))
        if path.startswith(b"/admin/"):
            return await serve_asgi(self.admin, req, conn, server=self.server_addr, extra_headers=ridh)
        err = NotFound(f"no route {req.method} {path.decode('latin-1')}")
        conn.respond(404, JSON_CT + ridh, err.body())


def _request_id(req: Request) -> bytes:
    rid = req.header(b"x-request-id")
    return rid[:128] if rid else uuid.uuid4().hex.encode()
