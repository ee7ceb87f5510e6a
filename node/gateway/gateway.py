"""The `/v1` gateway and the other client APIs: the request path's stages, composed.

admit (node/gateway/admit.py) → schedule + call (schedule.py, call.py) → relay
(relay.py) → settle (settle.py), each handing the next a typed record
(node/gateway/exchange.py). This is the hot path, answered straight from the node's HTTP
server (node/gateway/httpd.py): no framework routing, no ASGI messages, no validation
models, no disk or database I/O. Paths the node answers itself (model listings, /v1/me)
are answered here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from node.accounts.keys import KeyRecord, KeyRing
from node.accounts.ledger import Ledger
from node.accounts.quotas import Quotas
from node.errors import InvalidRequest, NodeError, NotFound, RateLimited
from node.gateway import catalog, fields
from node.gateway.adapter import OPENAI, ModelView, Route
from node.gateway.admit import Admitter, parse
from node.gateway.call import Caller
from node.gateway.exchange import Admitted, ModelInfo, error_headers
from node.gateway.httpd import Connection, Request
from node.gateway.me import SelfUsage, self_service
from node.gateway.relay import relay
from node.gateway.schedule import QUEUE_WAIT_S, Schedule
from node.gateway.scheduler import Scheduler
from node.gateway.settle import Books, Settlement
from node.gateway.upstream import Pool
from node.ops.metrics import Metrics, refusal_reason
from node.supply.modelcard import ModelCard
from node.workers.router import Router

log = logging.getLogger("infernode.gateway")

PROXIED = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/v1/rerank": "rerank",
    b"/v1/score": "score",
}


class Gateway:
    """Answers `/v1` requests and other client APIs' (node/gateway/dispatch.py hands them over)."""

    def __init__(self, *, keys: KeyRing, quotas: Quotas, router: Router, ledger: Ledger, metrics: Metrics,
                 models: dict[str, ModelInfo], client: Pool, format_of: Callable[[str], str] = lambda model: "",
                 card_of: Callable[[str], ModelCard | None] = lambda model: None,
                 queue_wait_s: float = QUEUE_WAIT_S, log_prompts: bool = False,
                 ensure_loaded: Callable[[str], Awaitable[None]] | None = None, scheduler: Scheduler | None = None) -> None:
        self.keys, self.quotas, self.router, self.ledger, self.metrics = keys, quotas, router, ledger, metrics
        self.models = models
        self.format_of = format_of      # model name: its weights' file format
        self.card_of = card_of          # model name: what its locked files say it is (Ollama's listings)
        # queue_wait_s: the default wait when no scheduler is given (a model's queue_timeout_s sets its own).
        self.schedule = Schedule(models, scheduler or Scheduler(router))
        self.admitter = Admitter(keys, quotas, router, log_prompts=log_prompts,
                                 loads_on_demand=ensure_loaded is not None)
        self.caller = Caller(router, client, self.schedule, quotas, ensure_loaded)
        self.books = Books(metrics, ledger)
        self.me_usage = SelfUsage(ledger)   # /v1/me/usage: cached, paced per key
        self.inflight = 0
        # Request ids (new_id): time, a random per-process prefix and a counter, 32 hex digits like
        # a UUID (unique, cheaper than uuid4, and accepted by workers that insist on UUIDs).
        self._rid_prefix = os.urandom(5).hex()
        self._rid_seq = itertools.count(1)

    @property
    def draining(self) -> bool:
        """Shutting down: new requests are refused (503)."""
        return self.admitter.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admitter.draining = value

    def set_models(self, models: dict[str, ModelInfo]) -> None:
        """New model settings (config reload); a model's gate is kept, with its new limits, while it stays."""
        self.schedule.set_models(models)
        self.models = models

    def busy(self, model: str) -> bool:
        """Whether requests for `model` are in flight or waiting (then it is not evicted)."""
        return self.schedule.busy(model)

    def new_id(self) -> str:
        """A node-made request id: 32 hex digits, the time in ms, this process's random prefix and a counter.

        Unique per request (the ledger's primary key), ordered by time, and never chosen by a client.
        """
        return f"{time.time_ns() // 1_000_000:012x}{self._rid_prefix}{next(self._rid_seq) & 0xFFFFFFFFFF:010x}"

    def authenticate(self, req: Request, route: Route | None = None) -> KeyRecord:
        """The key's record for a request; AuthenticationError when it has none or a bad one."""
        return self.admitter.authenticate(req, route or OPENAI)

    def context_len(self, info: ModelInfo) -> int | None:
        """The model's context: configured, else what its launch plan says."""
        return self.admitter.context_len(info)

    async def handle(self, req: Request, conn: Connection, route: Route | None = None) -> None:
        """Answer one `/v1` request, or one of another client API's (`route`: how to translate it)."""
        nid = self.new_id()
        rid_in = req.header(b"x-request-id")
        client_rid = fields.request_id(rid_in)
        rid = client_rid or nid
        ridb = rid.encode("latin-1")
        api = route or OPENAI
        settlement: Settlement | None = None
        try:
            key = self.admitter.authenticate(req, api)
            endpoint = self._endpoint(req, api)
            if endpoint is None:
                return await self._local(api, key, req, ridb, conn)
            adm, ex = self.admitter.admit(key, endpoint, api, client_rid, nid, req.lane,
                                          req.header(b"x-infernode-priority") == b"batch")
            ex.preempt = req.preempt
            settlement = self.books.open(ex, adm, self.models)
            body, api = await self.admitter.intake.read(req.body, api.api, api)
            a = self.admitter.check(req, api, key, adm, ex, self.models, ridb, body)
            api = a.route  # a runtime that serves the API itself gets it passed through (errors in OpenAI's shape)
            await self._serve(a, settlement, conn)
        except NodeError as err:
            if settlement is not None:
                settlement.ex.status = err.status
            if isinstance(err, RateLimited):
                self.metrics.quota_rejections.labels(err.reason).inc()
            if err.status < 500 or err.status == 503:  # the node said no (a worker's failure is not a refusal)
                self.metrics.refused.labels(refusal_reason(err.status, err.code)).inc()
            log.info("request %s refused: %d %s", rid, err.status, err.message)
            status, out = api.error(err, rid)
            conn.respond(status, error_headers(err, ridb), out)
        except BaseException as exc:
            if settlement is not None:  # the server answers 500; a cancelled request was answered nothing
                settlement.ex.status = 499 if isinstance(exc, asyncio.CancelledError) else 500
            raise
        finally:
            if settlement is not None:
                settlement.close()

    def _endpoint(self, req: Request, route: Route) -> str | None:
        """The OpenAI endpoint a path calls ('' for a translated route), or None for one the node answers itself."""
        path = req.path
        if not route.passthrough:
            if req.method != route.method:
                raise InvalidRequest(f"use {route.method} for {path.decode('latin-1')}", code="method_not_allowed")
            return None if route.local is not None else ""
        if req.method == "GET" and (catalog.is_catalog(path) or path in (b"/v1/me", b"/v1/me/usage")):
            return None
        endpoint = PROXIED.get(path)
        if endpoint is None:
            raise NotFound(f"no route {req.method} {path.decode(errors='replace')}")
        if req.method != "POST":
            raise InvalidRequest(f"use POST for {path.decode()}", code="method_not_allowed")
        return endpoint

    async def _serve(self, a: Admitted, settlement: Settlement, conn: Connection) -> None:
        """Wait for a slot, call the worker and relay its answer; the slot and the worker are let go after."""
        ex = a.ex
        self.inflight += 1
        # From here on a client that goes away cancels this task (node/gateway/httpd.py): in the
        # queue, while the worker computes a non-streamed answer, or mid-stream.
        try:
            up, gate = await self.caller.call(a, self.models)
            gauge = self.books.series(ex.model).inflight
            gauge.inc()
            try:
                out_headers = [(b"x-request-id", a.ridb), (b"x-infernode-model", ex.model.encode())]
                if a.adm.wire_headers:
                    out_headers += a.adm.wire_headers
                await relay(up, a.route, a.call, settlement, out_headers, conn)
            finally:
                # Back to the pool when read to the end; else closed, which cancels the worker's work.
                up.resp.close(keep=not ex.stream or up.target.keeps_stream_connections)
                up.target.end()
                gauge.dec()
                gate.release(time.perf_counter() - ex.started)
        except asyncio.CancelledError:
            if not conn.gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            ex.status = 499
            log.info("request %s: client disconnected", ex.client_rid or ex.rid)
        finally:
            self.inflight -= 1

    async def _local(self, route: Route, key: KeyRecord, req: Request, ridb: bytes, conn: Connection) -> None:
        """A path the node answers itself: OpenAI's model list, /v1/me, another API's listings and details."""
        if route.passthrough:
            if catalog.is_catalog(req.path):
                return catalog.answer(self, key, req, ridb, conn)
            return await self_service(self, key, req, ridb, conn)
        assert route.local is not None  # only routes the node answers itself come here
        parsed = parse(req.body) if route.method == "POST" else None
        views = [ModelView(m.name, m.created, self.context_len(m), bool(self.router.ready(m.name)),
                           self.format_of(m.name), self.card_of(m.name)) for m in self.models.values()
                 if self.quotas.allows(key, m.name)]
        conn.respond(200, [(b"content-type", route.content_type), (b"x-request-id", ridb)], route.local(views, parsed))
