"""The OpenAI-compatible `/v1` gateway: auth, admission, backpressure, routing and a byte-faithful proxy.

This is the hot path, answered straight from the node's HTTP server (node/gateway/httpd.py):
no framework routing, no ASGI messages, no validation models, no disk or database
I/O. Bodies go to the worker unchanged except for the model name (when the worker
serves it under another name) and `stream_options` (when the node must ask for
streamed usage); streamed bytes are passed on as whole SSE events as they arrive, and
only events that mention usage are looked into (node/gateway/sse.py). Upstream HTTP is node/gateway/upstream.py's keep-alive pool.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from node.accounts.keys import KeyRing
from node.accounts.ledger import Ledger
from node.accounts.quotas import Admission, Quotas
from node.accounts.storage import UsageRow
from node.errors import (
    AuthenticationError,
    InvalidRequest,
    ModelNotFound,
    NodeError,
    NoReadyReplica,
    NotFound,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from node.gateway import context, fields, translated
from node.gateway.adapter import Call, ModelView, Route, bearer
from node.gateway.bodies import usage_of, worker_error
from node.gateway.httpd import Connection, Request
from node.gateway.intake import Intake
from node.gateway.me import self_service
from node.gateway.sse import SseRelay
from node.gateway.upstream import BrokenResponse, ConnectFailed, Pool, Response, TimedOut, UpstreamFailure
from node.ops.logs import access as access_log
from node.ops.metrics import Metrics, ModelSeries, refusal_reason
from node.workers.router import Gate, QueueFull, Router

log = logging.getLogger("infernode.gateway")

PROXIED = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/v1/rerank": "rerank",
    b"/v1/score": "score",
}
OPENAI_ENDPOINTS = frozenset(PROXIED.values())
JSON_CT = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
QUEUE_WAIT_S = 30.0


class WorkerUnreachable(UpstreamError):
    """The worker failed before any byte reached the client: another model may take the request."""


def error_headers(err: NodeError, rid: bytes) -> list[tuple[bytes, bytes]]:
    return JSON_CT + [(b"x-request-id", rid)] + [(k.encode(), v.encode()) for k, v in err.headers.items()]


@dataclass
class ModelInfo:
    """What the gateway knows about a configured model."""

    name: str
    max_model_len: int | None = None
    price_input: float = 0.0      # per million tokens
    price_output: float = 0.0
    max_inflight: int = 64
    max_queue: int = 256
    read_timeout_s: float = 600.0   # the worker's silence before a request fails (504)
    connect_timeout_s: float = 5.0
    on_demand: bool = False       # loaded by requests: a request waits for its load
    fallbacks: tuple[str, ...] = ()   # models that take what this one cannot, in order
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(slots=True)
class Exchange:
    """One proxied request's bookkeeping."""

    rid: str
    model: str
    endpoint: str
    key_id: str | None
    team: str | None
    user: str | None
    started: float
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    api: str = "openai"
    client_rid: str | None = None


class Gateway:
    """Answers `/v1` requests (node/gateway/dispatch.py hands them over)."""

    def __init__(self, *, keys: KeyRing, quotas: Quotas, router: Router, ledger: Ledger, metrics: Metrics,
                 models: dict[str, ModelInfo], client: Pool,
                 stream_usage: Callable[[Any], bool], upstream_model: Callable[[Any], str | None] = lambda t: None,
                 uuid_request_ids: Callable[[Any], bool] = lambda t: False,
                 serves_api: Callable[[Any, str], bool] = lambda t, api: False,
                 cannot: Callable[[Any, str], str | None] = lambda t, endpoint: None,
                 format_of: Callable[[str], str] = lambda model: "",
                 upstream_headers: Callable[[Any], tuple[tuple[str, str], ...]] = lambda t: (),
                 queue_wait_s: float = QUEUE_WAIT_S, log_prompts: bool = False,
                 ensure_loaded: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.keys, self.quotas, self.router, self.ledger, self.metrics = keys, quotas, router, ledger, metrics
        self.models = models
        self.client = client
        self.stream_usage = stream_usage
        self.upstream_model = upstream_model
        self.uuid_request_ids = uuid_request_ids
        self.serves_api = serves_api    # (target, api name): the runtime serves that API itself
        self.cannot = cannot            # (target, endpoint): why its runtime cannot serve that endpoint, or None
        self.format_of = format_of      # model name: its weights' file format
        self.upstream_headers = upstream_headers  # e.g. an external model's Authorization (api_key_env)
        self.queue_wait_s = queue_wait_s
        self.log_prompts = log_prompts
        # Loads an on-demand model that has no ready replica, or raises NoReadyReplica (node/workers/loader.py).
        self.ensure_loaded = ensure_loaded
        self.gates = {name: Gate(m.max_inflight, m.max_queue) for name, m in models.items()}
        self.intake = Intake()  # bodies decoded, checked and (when large) translated off the loop
        self.draining = False
        self.inflight = 0
        self._series: dict[str, ModelSeries] = {}
        # Request ids (new_id): time, a random per-process prefix and a counter, 32 hex digits like
        # a UUID (unique, cheaper than uuid4, and accepted by workers that insist on UUIDs).
        self._rid_prefix = os.urandom(5).hex()
        self._rid_seq = itertools.count(1)

    def set_models(self, models: dict[str, ModelInfo]) -> None:
        """New model settings (config reload); a model's gate is kept, with its new limits, while it stays."""
        gates = {}
        for name, m in models.items():
            gate = self.gates.get(name) or Gate(m.max_inflight, m.max_queue)
            gate.max_inflight, gate.max_queue = m.max_inflight, m.max_queue
            gates[name] = gate
        self.models, self.gates = models, gates

    def new_id(self) -> str:
        """A node-made request id: 32 hex digits, the time in ms, this process's random prefix and a counter.

        Unique per request (the ledger's primary key), ordered by time, and never chosen by a client.
        """
        return f"{time.time_ns() // 1_000_000:012x}{self._rid_prefix}{next(self._rid_seq) & 0xFFFFFFFFFF:010x}"

    async def handle(self, req: Request, conn: Connection, route: Route | None = None) -> None:
        """Answer one `/v1` request, or one of another client API's (`route`: how to translate it).

        Order: authenticate, admit (rpm counts the request from here, whatever follows), decode
        and check the body, route. Bad input of any shape is a 4xx in the API's error shape.
        """
        nid = self.new_id()
        rid_in = req.header(b"x-request-id")
        client_rid = fields.request_id(rid_in)
        rid = client_rid or nid
        ridb = rid.encode("latin-1")
        ex: Exchange | None = None
        adm: Admission | None = None
        info: ModelInfo | None = None
        try:
            path = req.path
            key = self.authenticate(req, route)
            if route is not None:
                if req.method != route.method:
                    raise InvalidRequest(f"use {route.method} for {path.decode('latin-1')}", code="method_not_allowed")
                if route.local is not None:
                    return self._local(route, key, req, ridb, conn)
                endpoint = ""
            else:
                if path == b"/v1/models" and req.method == "GET":
                    return self._list_models(key, ridb, conn)
                if path in (b"/v1/me", b"/v1/me/usage") and req.method == "GET":
                    return await self_service(self, key, req, ridb, conn)
                endpoint = PROXIED.get(path)  # type: ignore[assignment]
                if endpoint is None:
                    raise NotFound(f"no route {req.method} {path.decode(errors='replace')}")
                if req.method != "POST":
                    raise InvalidRequest(f"use POST for {path.decode()}", code="method_not_allowed")
            # Rate admission before the body is decoded or checked: invalid requests count too.
            adm = self.quotas.admit(key)
            ex = Exchange(nid, "", endpoint, key.id, key.team, None, time.perf_counter(),
                          api=route.api if route is not None else "openai", client_rid=client_rid)
            body, route = await self.intake.read(req.body, ex.api, route)
            info, body, path, route, call = self._admit_body(body, key, adm, ex, path, route)
            await self._proxy(body, path, req.body, info, adm, ex, ridb, conn, route, call)
        except NodeError as err:
            if ex is not None:
                ex.status = err.status
            if isinstance(err, RateLimited):
                self.metrics.quota_rejections.labels(err.reason).inc()
            if err.status < 500 or err.status == 503:  # the node said no (a worker's failure is not a refusal)
                self.metrics.refused.labels(refusal_reason(err.status, err.code)).inc()
            log.info("request %s refused: %d %s", rid, err.status, err.message)
            if route is None:
                conn.respond(err.status, error_headers(err, ridb), err.body())
            else:
                status, out = route.error(err, rid)
                conn.respond(status, error_headers(err, ridb), out)
        except BaseException as exc:
            if ex is not None:  # the server answers 500; a cancelled request was answered nothing
                ex.status = 499 if isinstance(exc, asyncio.CancelledError) else 500
            raise
        finally:
            if ex is not None and adm is not None:
                if info is not None and info.name != ex.model:  # a fallback served it: its prices
                    info = self.models.get(ex.model, info)
                self._account(ex, adm, info)

    def _admit_body(self, req: dict[str, Any], key, adm: Admission, ex: Exchange, path: bytes,
                    route: Route | None) -> tuple[ModelInfo, dict[str, Any], bytes, Route | None, Call | None]:
        """Check what the node itself reads of a body (model, user, stream_options, the prompt's size) and
        translate another API's; the rest is the worker's. Returns the model, the OpenAI body, path, route, call."""
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required", param="model")
        if route is not None and model not in self.models and model.endswith(":latest"):
            model = model[:-7]  # Ollama's clients name the default tag
        info = self.models.get(model)
        if info is None:
            raise ModelNotFound(f"the model '{model[:256]}' does not exist on this node", param="model")
        ex.model = adm.model = model
        self.quotas.check_model(key, model)
        if self.draining:
            raise NoReadyReplica("the node is shutting down", retry_after=5)
        call = None
        endpoint = ex.endpoint
        if route is not None:
            targets = self.router.ready(model)
            if route.native and targets and self.serves_api(targets[0], route.native):
                endpoint, path = route.api, b"/v1" + route.native_path.encode()  # the runtime speaks it: pass through
                req["model"] = model
                route = None
            else:
                call = Call(model, ex.client_rid or ex.rid, int(time.time()), req, time.perf_counter())
                endpoint, req = route.to_openai(req)  # type: ignore[misc]
                req["model"] = model
        ex.endpoint = endpoint
        user = req.get("user")
        if isinstance(user, str) and user:
            ex.user = user
            self.quotas.admit_user(adm, user)
        ex.stream = req.get("stream") is True
        options = req.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        ready = self.router.ready(model)
        why = self.cannot(ready[0], endpoint) if ready else None
        if why:
            raise InvalidRequest(f"the model '{model}' cannot serve {endpoint}: {why}", param="model",
                                 code="unsupported_endpoint")
        if self.log_prompts:  # off unless `[node] log_prompts = true`: prompts are the users' data
            prompt = req.get("messages", req.get("prompt", req.get("input")))
            rid = ex.client_rid or ex.rid
            try:
                # Readable text; a lone surrogate (valid JSON) becomes a visible escape rather than breaking the log.
                shown = json.dumps(prompt, ensure_ascii=False)[:8192].encode("utf-8", "backslashreplace").decode()
            except (RecursionError, ValueError):
                shown = "(not loggable)"
            log.info("request %s prompt", rid, extra={"request_id": rid, "model": model, "prompt": shown})
        if endpoint in ("chat", "completions"):
            context.check(req, endpoint, self.context_len(info))
        if not ready and not (info.on_demand and self.ensure_loaded is not None) and not any(
                (m.on_demand and self.ensure_loaded is not None) or self.router.ready(m.name)
                for m in self._chain(info, key)[1:]):
            raise NoReadyReplica(f"model '{model}' has no ready replica yet", retry_after=5)
        return info, req, path, route, call

    # -- request checks ----------------------------------------------------------
    def authenticate(self, req: Request, route: Route | None = None):
        """The key's record for a request; AuthenticationError when it has none or a bad one."""
        if req.auth is not None:  # authenticated from the head, before the body was read (dispatch.py)
            return req.auth
        secret = route.credential(req) if route is not None else bearer(req)
        if not secret:
            hint = "x-api-key or Authorization: Bearer" if route is not None and route.api == "anthropic" else \
                "Authorization: Bearer"
            raise AuthenticationError(f"missing API key: send {hint} <key>")
        record = self.keys.lookup(secret.decode("latin-1"))
        if record is None:
            raise AuthenticationError("invalid API key")
        return record

    def _list_models(self, key, ridb: bytes, conn: Connection) -> None:
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "infernode",
             "max_model_len": self.context_len(m)}
            for m in self.models.values() if self.quotas.allows(key, m.name)
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        conn.respond(200, JSON_CT + [(b"x-request-id", ridb)], body)

    def _worker_rid(self, rid: str, target: Any) -> str:
        """The request id for the worker: the client's, unless the runtime insists on a UUID and it is not one."""
        if not self.uuid_request_ids(target):
            return rid
        try:
            return str(uuid.UUID(rid))
        except ValueError:
            # llama-cpp-python answers 400 to a non-UUID x-request-id; send a stable UUID derived from it.
            wid = str(uuid.uuid5(uuid.NAMESPACE_URL, rid))
            log.info("request %s is %s at the worker", rid, wid)
            return wid

    def _metrics_for(self, model: str) -> ModelSeries:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = ModelSeries(self.metrics, model)
        return series

    def context_len(self, info: ModelInfo) -> int | None:
        """The model's context: configured, else what its launch plan says."""
        return info.max_model_len or self.router.context.get(info.name)

    def _local(self, route: Route, key, req: Request, ridb: bytes, conn: Connection) -> None:
        """A path of another client API answered by the node itself (listings, model details)."""
        assert route.local is not None  # only routes the node answers itself come here
        parsed = _parse(req.body) if route.method == "POST" else None
        views = [ModelView(m.name, m.created, self.context_len(m), bool(self.router.ready(m.name)),
                           self.format_of(m.name)) for m in self.models.values()
                 if self.quotas.allows(key, m.name)]
        conn.respond(200, [(b"content-type", route.content_type), (b"x-request-id", ridb)], route.local(views, parsed))

    def _chain(self, info: ModelInfo, key: Any) -> list[ModelInfo]:
        """The model, then each fallback the key may use, in order."""
        if not info.fallbacks:
            return [info]
        models, quotas = self.models, self.quotas
        return [info] + [models[f] for f in info.fallbacks if f in models and quotas.allows(key, f)]

    # -- the proxy ---------------------------------------------------------------
    async def _proxy(self, req: dict, path: bytes, body: bytes, info: ModelInfo, adm: Admission, ex: Exchange,
                     ridb: bytes, conn: Connection, route: Route | None = None, call: Call | None = None) -> None:
        chain = self._chain(info, adm.key)
        loadable = self.ensure_loaded is not None
        gate = None
        self.inflight += 1
        # From here on a client that goes away cancels this task (node/gateway/httpd.py): in the
        # queue, while the worker computes a non-streamed answer, or mid-stream.
        try:
            for i, cand in enumerate(chain):
                last = i == len(chain) - 1
                on_demand = cand.on_demand and loadable
                if not last and not on_demand and not self.router.ready(cand.name):
                    continue  # not ready: the next fallback
                # The model that serves it is the one the ledger, the metrics and prices name.
                ex.model = adm.model = cand.name
                g = self.gates[cand.name]
                try:
                    await g.enter(self.queue_wait_s)
                except QueueFull as full:
                    if not last:
                        continue  # overloaded: the next fallback
                    raise _overloaded(cand.name, g, full.retry_after) from None
                gate = g
                try:
                    if on_demand and not self.router.ready(cand.name):
                        # Holding its slot keeps the model busy, so no other load evicts it before this request is routed.
                        await self.ensure_loaded(cand.name)  # type: ignore[misc]
                    await self._route(req, body, cand, path, ex, adm, ridb, conn, route, call)
                except (WorkerUnreachable, NoReadyReplica) as err:
                    if last:
                        raise
                    log.warning("request %s: %s; trying the next fallback", ex.client_rid or ex.rid, err.message)
                    gate.leave(time.perf_counter() - ex.started)
                    gate = None
                    continue
                break
        except asyncio.CancelledError:
            if not conn.gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            ex.status = 499
            log.info("request %s: client disconnected", ex.client_rid or ex.rid)
        finally:
            self.inflight -= 1
            if gate is not None:
                gate.leave(time.perf_counter() - ex.started)

    async def _route(self, req: dict, body: bytes, info: ModelInfo, path: bytes, ex: Exchange, adm: Admission,
                     ridb: bytes, conn: Connection, route: Route | None = None, call: Call | None = None) -> None:
        endpoint = ex.endpoint
        target = self.router.pick(ex.model)
        if target is None:
            raise NoReadyReplica(f"model '{ex.model}' has no ready replica yet", retry_after=5)
        client_wants_usage = bool(req.get("stream_options") and req["stream_options"].get("include_usage"))
        worker_usage = self.stream_usage(target)
        changed = False
        if ex.stream and worker_usage and not client_wants_usage and endpoint in ("chat", "completions"):
            req["stream_options"] = {**(req.get("stream_options") or {}), "include_usage": True}
            changed = True
        name = self.upstream_model(target) or ex.model
        if name != req.get("model"):  # the worker's own name, or the fallback's
            req["model"] = name
            changed = True
        native = endpoint not in OPENAI_ENDPOINTS  # another API the runtime serves itself, passed through
        if changed or call is not None or native:
            try:
                body = json.dumps(req).encode()
            except RecursionError:
                raise InvalidRequest("request body is nested too deeply") from None
        relay = SseRelay(drop_usage=not client_wants_usage and not native,
                         count_content=not worker_usage) if ex.stream else None
        headers: tuple[tuple[str, str], ...] = (
            ("content-type", "application/json"), ("x-request-id", self._worker_rid(ex.client_rid or ex.rid, target)))
        extra = self.upstream_headers(target)
        if extra:
            headers += extra
        subpath = path.decode()[3:] if call is None else translated.SUBPATHS[endpoint]
        for attempt in (0, 1):
            target.inflight += 1  # counted from the request's start, for least-outstanding routing
            try:
                resp = await self.client.request("POST", target.openai_base, subpath, body, headers,
                                                 read_timeout=info.read_timeout_s, connect_timeout=info.connect_timeout_s)
            except ConnectFailed as exc:
                target.inflight -= 1
                # Nothing reached the client yet: retry once on another replica.
                log.warning("request %s: worker %s unreachable (%s)", ex.rid, target.id, exc)
                other = self.router.pick(ex.model, exclude=target) if attempt == 0 else None
                if other is None:
                    raise WorkerUnreachable(f"the worker for '{ex.model}' is unreachable: {exc}") from None
                target = other
                continue
            except BaseException as exc:
                target.inflight -= 1
                if isinstance(exc, TimedOut):
                    raise UpstreamTimeout(f"the worker for '{ex.model}' did not answer in time") from None
                if isinstance(exc, UpstreamFailure):
                    raise WorkerUnreachable(f"the worker for '{ex.model}' failed: {exc}") from None
                raise
            break
        gauge = self._metrics_for(ex.model).inflight
        gauge.inc()
        try:
            if route is not None and call is not None:
                await translated.answer(resp, ex, adm, relay, route, call, self._out_headers(adm, ridb, ex.model), conn)
            else:
                await self._respond(resp, ex, adm, relay, client_wants_usage, ridb, conn)
        finally:
            resp.close()  # back to the pool when read to the end; else closed, which cancels the worker's work
            target.inflight -= 1
            gauge.dec()

    @staticmethod
    def _out_headers(adm: Admission, ridb: bytes, model: str) -> list[tuple[bytes, bytes]]:
        out_headers = [(b"x-request-id", ridb), (b"x-infernode-model", model.encode())]
        if adm.wire_headers:
            out_headers += adm.wire_headers
        return out_headers

    async def _respond(self, resp: Response, ex: Exchange, adm: Admission, relay: SseRelay | None,
                       client_wants_usage: bool, ridb: bytes, conn: Connection) -> None:
        out_headers = self._out_headers(adm, ridb, ex.model)
        ctype = resp.header(b"content-type") or b"application/json"
        if resp.status >= 400:
            raw = await _read_or_fail(resp, ex)
            ex.status = resp.status
            status = resp.status if resp.status < 500 else 502
            ex.status = status  # what the client got: a worker's 5xx is the node's 502
            log.info("request %s: worker answered %d", ex.rid, resp.status)
            conn.respond(status, JSON_CT + out_headers, worker_error(raw, resp.status))
            return
        if relay is None or not ctype.startswith(b"text/event-stream"):
            raw = await _read_or_fail(resp, ex)
            ex.first_token_at = time.perf_counter()
            usage = usage_of(raw)
            if usage:  # OpenAI's chat/completions names, or the Responses API's
                ex.prompt_tokens = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
                ex.completion_tokens = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
            conn.respond(resp.status, [(b"content-type", ctype)] + out_headers, raw)
            return
        conn.start(200, SSE_HEADERS + out_headers)
        synth = relay.count_content and client_wants_usage
        finished = False  # the client's stream ended with [DONE]; what follows upstream is only drained
        try:
            async for chunk in resp.chunks():
                out = relay.feed(chunk)
                if out and not finished:
                    if ex.first_token_at is None and relay.first_content:
                        ex.first_token_at = time.perf_counter()
                    done = relay.saw_done and not relay.buf
                    if synth and relay.saw_done:
                        out = relay.synth_usage(out, model=ex.model, chat=ex.endpoint == "chat",
                                                prompt_tokens=ex.prompt_tokens)
                    finished = done
                    if finished:
                        resp.drain_timeout(5.0)  # only the end of the framing should follow
                        # Charge quotas before the client sees [DONE], so its next request already counts them.
                        _stream_tokens(relay, ex)
                        adm.finish(ex.prompt_tokens, ex.completion_tokens)
                    if finished:
                        conn.end(out)  # the last event and the end of the body in one write
                    else:
                        await conn.write(out)
        except UpstreamFailure as exc:
            if not finished:
                ex.status = 502
                log.warning("request %s: the worker for %s failed mid-stream: %s", ex.rid, ex.model, exc)
                err = UpstreamError(f"the worker for '{ex.model}' failed mid-stream: {exc}", source="worker")
                await conn.write(b"data: " + err.body() + b"\n\ndata: [DONE]\n\n")
        finally:
            _stream_tokens(relay, ex)
        if not finished:
            conn.end(relay.buf)

    def _account(self, ex: Exchange, adm: Admission, info: ModelInfo | None) -> None:
        """Charge quotas, count metrics, queue the ledger row and write the access log line of an admitted request."""
        latency = time.perf_counter() - ex.started
        adm.finish(ex.prompt_tokens, ex.completion_tokens)
        ttft = ex.first_token_at - ex.started if ex.first_token_at is not None else None
        cost = 0.0
        if info is not None:  # a configured model: its series (never a label a client made up)
            m = self._metrics_for(ex.model)
            m.requests(ex.status).inc()
            m.duration.observe(latency)
            if ttft is not None and ex.stream:
                m.ttft.observe(ttft)
            if ex.prompt_tokens:
                m.prompt.inc(ex.prompt_tokens)
            if ex.completion_tokens:
                m.completion.inc(ex.completion_tokens)
            cost = (ex.prompt_tokens * info.price_input + ex.completion_tokens * info.price_output) / 1e6
        # Positional (UsageRow's field order): keyword calls cost the request path a few µs.
        self.ledger.record(UsageRow(ex.rid, time.time(), ex.key_id, ex.team, ex.model, ex.endpoint, ex.user,
                                    ex.prompt_tokens, ex.completion_tokens, ex.status, latency * 1000,
                                    ttft * 1000 if ttft is not None else None, cost, ex.api, ex.client_rid))
        access_log(ex.client_rid or ex.rid, ex.model, ex.key_id, ex.status, latency, ex.endpoint, ttft,
                   ex.prompt_tokens, ex.completion_tokens)


def _parse(body: bytes) -> dict[str, Any]:
    """A request body: a JSON object, or a 400."""
    try:
        # RFC 8259: JSON on the wire is UTF-8; decoding it first skips json's encoding sniffing.
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not UTF-8 JSON") from None
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(req, dict):
        raise InvalidRequest("request body must be a JSON object")
    return req


async def _read_or_fail(resp: Response, ex: Exchange) -> bytes:
    """A whole (non-streamed) answer; a worker failing half way is a 502/504 from the worker."""
    try:
        return await resp.read()
    except TimedOut:
        raise UpstreamTimeout(f"the worker for '{ex.model}' stopped answering", source="worker") from None
    except BrokenResponse as exc:
        log.warning("request %s: the worker for %s failed: %s", ex.rid, ex.model, exc)
        raise UpstreamError(f"the worker for '{ex.model}' failed: {exc}", source="worker") from None


def _stream_tokens(relay: SseRelay, ex: Exchange) -> None:
    """Token counts of a stream: the worker's usage chunk, else one per content event."""
    if relay.usage:
        ex.prompt_tokens = int(relay.usage.get("prompt_tokens") or relay.usage.get("input_tokens") or 0)
        ex.completion_tokens = int(relay.usage.get("completion_tokens") or relay.usage.get("output_tokens") or 0)
    elif relay.count_content:
        ex.completion_tokens = relay.content_events


def _overloaded(model: str, gate: Gate, retry_after: float) -> RateLimited:
    """429 model_overloaded with the x-ratelimit-* headers of the model's capacity."""
    return RateLimited(
        f"model '{model}' is at capacity ({gate.max_inflight} in flight, {gate.queued} queued); retry later",
        retry_after=retry_after, reason="model_capacity", code="model_overloaded", headers={
            "x-ratelimit-limit-requests": str(gate.max_inflight + gate.max_queue),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{max(1, min(60, int(retry_after + 0.999)))}s"})
