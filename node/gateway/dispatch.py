"""The node's one HTTP port: what each path is answered by, and who may send it a body.

`/v1/*` goes to the gateway (the hot path, node/gateway/gateway.py), and so do the paths of the
other client APIs it translates (API_ROUTES: Anthropic's Messages, OpenAI's Responses,
Ollama's API, each a Route of node/gateway/adapter.py); `/healthz`, `/readyz` and
`/metrics` are answered here; `/admin/*` goes to the FastAPI admin app through the
ASGI bridge; `/ui/*` is the web console (node/console/), whose API calls come back here
as `/v1` or `/admin` requests carrying the signed-in principal's secret. Every response
carries an `x-request-id` (the client's if it sent one).

`check_head` runs when a request's head is complete, before its body is read
(node/gateway/httpd.py): API routes authenticate their key there (each Route says where
its key comes from and how its errors look), so a client without one is refused (401,
connection closed) without the node buffering its body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import uuid
from typing import TYPE_CHECKING

from node.admin.routes import build_admin
from node.console.web import FORWARD_HEADERS, Answer, Console
from node.errors import AuthenticationError, NodeError, NoReadyReplica, NotFound, RateLimited
from node.gateway import anthropic, fields, ollama, responses
from node.gateway.adapter import Route, bearer
from node.gateway.asgi import serve_asgi
from node.gateway.exchange import JSON_CT, error_headers
from node.gateway.httpd import Connection, Refusal, Request
from node.ops.metrics import refusal_reason

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node

log = logging.getLogger("infernode.dispatch")

API_ROUTES: dict[bytes, Route] = {**anthropic.ROUTES, **responses.ROUTES, **ollama.ROUTES}
METRICS_CT = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
ADMIN_BODY_BYTES = 1 << 20   # admin bodies are small JSON documents


class NodeApp:
    """The request handler `infernode up` serves (node/gateway/httpd.py calls it for every request)."""

    def __init__(self, node: Node, server_addr: tuple[str, int] | None = None) -> None:
        self.node = node
        self.admin = build_admin(node)
        self.server_addr = server_addr
        self.scheme = node.config.node.scheme
        self.console = Console(node.identify, secure=self.scheme == "https", node_name=node.config.node.name,
                               pacer=node.accounts.pacer)
        env = node.config.node.metrics_token_env
        self.metrics_token: bytes | None = None
        if env:
            # Named but unset fails closed: /metrics then refuses everyone.
            self.metrics_token = os.environ.get(env, "").strip().encode()
            if not self.metrics_token:
                log.error("[node] metrics_token_env names %s, which is unset or empty: /metrics refuses every "
                          "request until it is set", env)

    def check_head(self, req: Request) -> Refusal | None:
        """Before the body: authenticate API keys, guard /metrics, bound admin bodies."""
        path = req.path
        route = API_ROUTES.get(path)
        if route is not None or path.startswith(b"/v1/"):
            return self._authenticate(req, route) or self._batch_head(req)
        if path == b"/metrics" and self.metrics_token is not None:
            paced = self._paced(req)
            if paced is not None:
                return Refusal(paced.status, error_headers(paced, _request_id(req)), paced.body())
            presented = bearer(req) or b""
            if not self.metrics_token or not hmac.compare_digest(presented, self.metrics_token):
                self.node.accounts.pacer.failed(req.client)
                err = AuthenticationError("metrics token required: send Authorization: Bearer <token>",
                                          code="invalid_metrics_token", headers={"www-authenticate": "Bearer"})
                return Refusal(401, error_headers(err, _request_id(req)), err.body())
        elif path == b"/ui" or path.startswith(b"/ui/"):
            # The console's own bodies are small forms; its API calls are bounded like the API they reach.
            refused, limit = self.console.check_head(req.method, path.decode("latin-1"), req.headers)
            if refused is not None:
                return Refusal(refused.status, refused.headers + [(b"x-request-id", _request_id(req))], refused.body)
            req.body_limit = min(req.body_limit, limit or ADMIN_BODY_BYTES)
        elif path.startswith(b"/admin/"):
            req.body_limit = min(req.body_limit, ADMIN_BODY_BYTES)
            if path.startswith(b"/admin/v1/") and req.header(b"authorization") is None:
                err = AuthenticationError("admin key required: send Authorization: Bearer <admin key>")
                return Refusal(401, error_headers(err, _request_id(req)), err.body())
        return None

    def _paced(self, req: Request) -> RateLimited | None:
        """429 for an address past its failed authentications (node/accounts/pacing.py), before any credential is read."""
        wait = self.node.accounts.pacer.retry_after(req.client)
        if not wait:
            return None
        return RateLimited("too many failed authentications from this address; retry later", retry_after=wait,
                           reason="auth_failures", code="too_many_auth_failures")
    def _batch_head(self, req: Request) -> Refusal | None:
        """A file upload gets the upload limit as its body limit, while an upload slot is free (node/batches/api.py)."""
        batch_api = self.node.batch_api
        if batch_api is None or not batch_api.handles(req.path):
            return None
        limit = batch_api.head_limit(req, self.node.config.batches.max_file_bytes)
        if limit == 0:
            err = RateLimited("too many file uploads at once; retry shortly", retry_after=2, reason="uploads")
            return Refusal(429, error_headers(err, _request_id(req)), err.body())
        if limit is not None:
            req.body_limit = limit
        return None

    def _authenticate(self, req: Request, route: Route | None) -> Refusal | None:
        gateway = self.node.gateway
        if gateway is None:
            return None  # still starting: the handler answers 503
        err: NodeError | None = self._paced(req)
        if err is None:
            try:
                req.auth = gateway.authenticate(req, route)
                return None
            except AuthenticationError as exc:
                self.node.accounts.pacer.failed(req.client)
                err = exc
        gateway.metrics.refused.labels(refusal_reason(err.status, err.code)).inc()
        rid = _request_id(req)
        status, body = (err.status, err.body()) if route is None else route.error(err, rid.decode("latin-1"))
        return Refusal(status, error_headers(err, rid), body)

    async def __call__(self, req: Request, conn: Connection) -> None:
        path = req.path
        if path == b"/ui" or path.startswith(b"/ui/"):
            ui = self.console.handle(req.method, path.decode("latin-1"), req.headers, req.body, client=req.client)
            if isinstance(ui, Answer):
                return conn.respond(ui.status, ui.headers + [(b"x-request-id", _request_id(req))], ui.body)
            req.path, req.headers = ui.path, ui.headers
            path = req.path
            conn.override_headers = FORWARD_HEADERS  # the console's security headers on what comes back
        gateway = self.node.gateway
        route = API_ROUTES.get(path)
        if (route is not None or path.startswith(b"/v1/")) and gateway is not None:
            batch_api = self.node.batch_api
            if route is None and batch_api is not None and req.auth is not None and batch_api.handles(path):
                return await batch_api.handle(req, conn, req.auth, _request_id(req))
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
            return await serve_asgi(self.admin, req, conn, server=self.server_addr, extra_headers=ridh,
                                    scheme=self.scheme)
        err = NotFound(f"no route {req.method} {path.decode('latin-1')}")
        conn.respond(404, JSON_CT + ridh, err.body())


def _request_id(req: Request) -> bytes:
    rid = fields.request_id(req.header(b"x-request-id"))  # printable ASCII only: it reaches logs
    return rid.encode() if rid else uuid.uuid4().hex.encode()
