"""The OpenAI-compatible `/v1` gateway: auth, admission, routing and a byte-faithful proxy.

This is the hot path, written as a bare ASGI app: no framework routing, no
validation models, no disk or database I/O. Bodies go to the worker unchanged except
when the node must ask for streamed usage; streamed bytes are passed on as whole SSE
events as they arrive, and only events that mention usage are looked into.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx

from node.errors import (
    AuthenticationError, BodyTooLarge, InvalidRequest, ModelNotFound, NodeError, NoReadyReplica, NotFound,
    RateLimited, UpstreamError, UpstreamTimeout,
)
from node.keys import KeyRing
from node.ledger import Ledger
from node.metrics import Metrics
from node.quotas import Admission, Quotas
from node.router import Router
from node.storage import UsageRow

log = logging.getLogger("infernode.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PROXIED = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/v1/rerank": "rerank",
    b"/v1/score": "score",
}
JSON_CT = [(b"content-type", b"application/json")]
ID_RE = re.compile(rb'"id"\s*:\s*"([^"]*)"')
CONTENT_MARKS = (b'"content":"', b'"content": "', b'"text":"', b'"text": "')
EMPTY_MARKS = (b'"content":""', b'"content": ""', b'"text":""', b'"text": ""')


class ClientGone(Exception):
    """The client disconnected; the upstream call is abandoned."""


async def send_body(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error_headers(err: NodeError, rid: bytes) -> list[tuple[bytes, bytes]]:
    return JSON_CT + [(b"x-request-id", rid)] + [(k.encode(), v.encode()) for k, v in err.headers.items()]


@dataclass
class ModelInfo:
    """What the gateway knows about a configured model."""

    name: str
    max_model_len: int | None = None
    price_input: float = 0.0      # per million tokens
    price_output: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
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


class SseRelay:
    """Passes SSE bytes through whole events at a time, noting usage and tokens.

    `drop_usage`: hide the usage-only chunk the node asked for on the client's behalf.
    `count_content`: the runtime sends no usage; count one token per content event.
    """

    def __init__(self, *, drop_usage: bool, count_content: bool) -> None:
        self.drop_usage, self.count_content = drop_usage, count_content
        self.buf = b""
        self.usage: dict[str, Any] | None = None
        self.content_events = 0
        self.first_content = False
        self.stream_id: bytes | None = None
        self.saw_done = False

    def feed(self, chunk: bytes) -> bytes:
        data = self.buf + chunk if self.buf else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            if len(data) > 1 << 20:  # a pathological event: pass it on rather than grow
                self.buf = b""
                return data
            self.buf = data
            return b""
        out, self.buf = data[: cut + 2], data[cut + 2:]
        if self.stream_id is None:
            m = ID_RE.search(out)
            if m:
                self.stream_id = m.group(1)
        if self.count_content or not self.first_content:
            # Servers differ in JSON spacing ("content":"x" vs "content": "x").
            n = sum(out.count(p) for p in CONTENT_MARKS) - sum(out.count(p) for p in EMPTY_MARKS)
            if n > 0:
                self.first_content = True
                self.content_events += n
        if b"[DONE]" in out:
            self.saw_done = True
        if b'"usage":{' in out or b'"usage": {' in out:
            out = self._take_usage(out)
        return out

    def _take_usage(self, out: bytes) -> bytes:
        kept = []
        for event in out.split(b"\n\n"):
            if not event:
                continue
            if b'"usage"' in event and event.startswith(b"data:"):
                try:
                    obj = json.loads(event[5:])
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]
                    if self.drop_usage and not obj.get("choices"):
                        continue
            kept.append(event)
        return b"".join(e + b"\n\n" for e in kept)


class Gateway:
    """The `/v1` ASGI app."""

    def __init__(self, *, keys: KeyRing, quotas: Quotas, router: Router, ledger: Ledger, metrics: Metrics,
                 models: dict[str, ModelInfo], client: httpx.AsyncClient, max_body_bytes: int,
                 stream_usage: Callable[[Any], bool]) -> None:
        self.keys, self.quotas, self.router, self.ledger, self.metrics = keys, quotas, router, ledger, metrics
        self.models = models
        self.client = client
        self.max_body_bytes = max_body_bytes
        self.stream_usage = stream_usage
        self.draining = False
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid_in = _header(scope, b"x-request-id")
        rid = rid_in.decode("latin-1")[:128] if rid_in else uuid.uuid4().hex
        ridb = rid.encode("latin-1")
        try:
            path = scope["raw_path"].split(b"?", 1)[0] if scope.get("raw_path") else scope["path"].encode()
            key = self._authenticate(scope)
            if path == b"/v1/models" and scope["method"] == "GET":
                return await self._list_models(key, ridb, send)
            endpoint = PROXIED.get(path)
            if endpoint is None:
                raise NotFound(f"no route {scope['method']} {path.decode(errors='replace')}")
            if scope["method"] != "POST":
                raise InvalidRequest(f"use POST for {path.decode()}", code="method_not_allowed")
            body = await self._read_body(scope, receive)
            await self._proxy(endpoint, path, key, body, rid, ridb, receive, send)
        except ClientGone:
            return
        except NodeError as err:
            if isinstance(err, RateLimited):
                self.metrics.quota_rejections.labels(err.reason).inc()
            await send_body(send, err.status, err.body(), error_headers(err, ridb))

    # -- request checks ----------------------------------------------------------
    def _authenticate(self, scope: Scope):
        auth = _header(scope, b"authorization")
        if not auth or not auth[:7].lower() == b"bearer ":
            raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
        record = self.keys.lookup(auth[7:].strip().decode("latin-1"))
        if record is None:
            raise AuthenticationError("invalid API key")
        return record

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge(f"request body is {int(declared)} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            part = msg.get("body", b"")
            size += len(part)
            if size > self.max_body_bytes:
                raise BodyTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(part)
            if not msg.get("more_body"):
                return b"".join(chunks)

    async def _list_models(self, key, ridb: bytes, send: Send) -> None:
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "infernode",
             "max_model_len": self.router.context.get(m.name) or m.max_model_len}
            for m in self.models.values() if key.allows(m.name)
        ]
        body = json.dumps({"object": "list", "data": data}).encode()
        await send_body(send, 200, body, JSON_CT + [(b"x-request-id", ridb)])

    # -- the proxy ---------------------------------------------------------------
    async def _proxy(self, endpoint: str, path: bytes, key, body: bytes, rid: str, ridb: bytes,
                     receive: Receive, send: Send) -> None:
        try:
            req = json.loads(body)
        except ValueError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(req, dict):
            raise InvalidRequest("request body must be a JSON object")
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required", param="model")
        info = self.models.get(model)
        if info is None:
            raise ModelNotFound(f"the model '{model}' does not exist on this node", param="model")
        if self.draining:
            raise NoReadyReplica("the node is shutting down", retry_after=5)
        adm = self.quotas.admit(key, model, req.get("user") if isinstance(req.get("user"), str) else None)
        ex = Exchange(rid=rid, model=model, endpoint=endpoint, key_id=key.id, team=key.team,
                      user=req.get("user") if isinstance(req.get("user"), str) else None, started=time.perf_counter(),
                      stream=bool(req.get("stream")))
        try:
            target = self.router.pick(model)
            if target is None:
                raise NoReadyReplica(f"model '{model}' has no ready replica yet", retry_after=5)
            client_wants_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            worker_usage = self.stream_usage(target)
            if ex.stream and worker_usage and not client_wants_usage and endpoint in ("chat", "completions"):
                req["stream_options"] = {**(req.get("stream_options") or {}), "include_usage": True}
                body = json.dumps(req).encode()
            relay = SseRelay(drop_usage=not client_wants_usage, count_content=not worker_usage) if ex.stream else None
            await self._exchange(target, path, body, ex, adm, relay, client_wants_usage, ridb, receive, send)
        except NodeError as err:
            ex.status = err.status
            raise
        except ClientGone:
            ex.status = 499
        finally:
            self._account(ex, adm, info)

    async def _exchange(self, target, path: bytes, body: bytes, ex: Exchange, adm: Admission,
                        relay: SseRelay | None, client_wants_usage: bool, ridb: bytes,
                        receive: Receive, send: Send) -> None:
        headers = {"content-type": "application/json", "x-request-id": ex.rid}
        resp = None
        tried = None
        for attempt in (0, 1):
            url = target.openai_base + path.decode()[3:]
            target.inflight += 1
            self.inflight += 1
            try:
                resp = await self.client.send(self.client.build_request("POST", url, content=body, headers=headers), stream=True)
                break
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                # Nothing reached the client yet: retry once on another replica.
                target.inflight -= 1
                self.inflight -= 1
                tried = target
                other = self.router.pick(ex.model, exclude=tried) if attempt == 0 else None
                if other is None:
                    raise UpstreamError(f"worker for '{ex.model}' is unreachable: {type(exc).__name__}") from None
                target = other
            except httpx.TimeoutException:
                target.inflight -= 1
                self.inflight -= 1
                raise UpstreamTimeout(f"worker for '{ex.model}' did not answer in time") from None
        assert resp is not None
        self.metrics.inflight.labels(ex.model).inc()
        watcher = asyncio.create_task(_watch_disconnect(receive, asyncio.current_task()))
        try:
            await self._respond(resp, ex, adm, relay, client_wants_usage, ridb, send)
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                raise ClientGone() from None
            raise
        finally:
            watcher.cancel()
            await resp.aclose()
            target.inflight -= 1
            self.inflight -= 1
            self.metrics.inflight.labels(ex.model).dec()

    async def _respond(self, resp: httpx.Response, ex: Exchange, adm: Admission, relay: SseRelay | None,
                       client_wants_usage: bool, ridb: bytes, send: Send) -> None:
        out_headers = [(b"x-request-id", ridb)] + [(k.encode(), v.encode()) for k, v in adm.headers.items()]
        ctype = resp.headers.get("content-type", "application/json")
        if resp.status_code >= 400:
            raw = await resp.aread()
            ex.status = resp.status_code
            status = resp.status_code if resp.status_code < 500 else 502
            await send_body(send, status, _worker_error(raw, resp.status_code), JSON_CT + out_headers)
            return
        if relay is None or not ctype.startswith("text/event-stream"):
            raw = await resp.aread()
            ex.first_token_at = time.perf_counter()
            usage = _usage_of(raw)
            if usage:
                ex.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                ex.completion_tokens = int(usage.get("completion_tokens") or 0)
            await send_body(send, resp.status_code, raw, [(b"content-type", ctype.encode())] + out_headers)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")] + out_headers})
        try:
            async for chunk in resp.aiter_raw():
                out = relay.feed(chunk)
                if relay.first_content and ex.first_token_at is None:
                    ex.first_token_at = time.perf_counter()
                if out:
                    if relay.count_content and client_wants_usage and relay.saw_done:
                        out = self._synth_usage(out, relay, ex)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except httpx.HTTPError as exc:
            ex.status = 502
            log.warning("worker died mid-stream", extra={"request_id": ex.rid, "model": ex.model, "error": type(exc).__name__})
            err = UpstreamError(f"the worker for '{ex.model}' failed mid-stream ({type(exc).__name__})", source="worker")
            await send({"type": "http.response.body", "body": b"data: " + err.body() + b"\n\ndata: [DONE]\n\n",
                        "more_body": True})
        finally:
            self._stream_usage(relay, ex)
        if relay.buf:
            await send({"type": "http.response.body", "body": relay.buf, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _stream_usage(self, relay: SseRelay, ex: Exchange) -> None:
        if relay.usage:
            ex.prompt_tokens = int(relay.usage.get("prompt_tokens") or 0)
            ex.completion_tokens = int(relay.usage.get("completion_tokens") or 0)
        elif relay.count_content:
            ex.completion_tokens = relay.content_events

    def _synth_usage(self, out: bytes, relay: SseRelay, ex: Exchange) -> bytes:
        """The runtime cannot report stream usage; add the chunk the client asked for."""
        cut = out.rfind(b"data: [DONE]")
        usage = {"prompt_tokens": 0, "completion_tokens": relay.content_events, "total_tokens": relay.content_events}
        obj = {"id": (relay.stream_id or b"").decode(), "object": "chat.completion.chunk" if ex.endpoint == "chat" else "text_completion",
               "created": int(time.time()), "model": ex.model, "choices": [], "usage": usage}
        relay.saw_done = False
        return out[:cut] + b"data: " + json.dumps(obj).encode() + b"\n\n" + out[cut:]

    def _account(self, ex: Exchange, adm: Admission, info: ModelInfo) -> None:
        now = time.perf_counter()
        latency = now - ex.started
        adm.finish(ex.prompt_tokens, ex.completion_tokens)
        m = self.metrics
        m.requests.labels(ex.model, str(ex.status)).inc()
        m.duration.labels(ex.model).observe(latency)
        ttft = None
        if ex.first_token_at is not None:
            ttft = ex.first_token_at - ex.started
            if ex.stream:
                m.ttft.labels(ex.model).observe(ttft)
        if ex.prompt_tokens:
            m.tokens.labels(ex.model, "prompt").inc(ex.prompt_tokens)
        if ex.completion_tokens:
            m.tokens.labels(ex.model, "completion").inc(ex.completion_tokens)
        cost = (ex.prompt_tokens * info.price_input + ex.completion_tokens * info.price_output) / 1e6
        self.ledger.record(UsageRow(
            request_id=ex.rid, ts=time.time(), key_id=ex.key_id, team=ex.team, model=ex.model, endpoint=ex.endpoint,
            end_user=ex.user, prompt_tokens=ex.prompt_tokens, completion_tokens=ex.completion_tokens,
            status=ex.status, latency_ms=latency * 1000, ttft_ms=ttft * 1000 if ttft is not None else None, cost=cost,
        ))


async def _watch_disconnect(receive: Receive, task: asyncio.Task | None) -> bool:
    """Cancel the request's task when the client goes away; True if it did."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if task is not None:
                task.cancel()
            return True


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def _usage_of(raw: bytes) -> dict[str, Any] | None:
    if b'"usage"' not in raw:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def _worker_error(raw: bytes, status: int) -> bytes:
    """A worker's error, in OpenAI's shape, marked as coming from the worker."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        obj["error"]["source"] = "worker"
        obj["error"].setdefault("type", "invalid_request_error" if status < 500 else "upstream_error")
        return json.dumps(obj).encode()
    message = obj.get("detail") if isinstance(obj, dict) and "detail" in obj else raw.decode("utf-8", "replace")[:2000]
    if not isinstance(message, str):
        message = json.dumps(message)
    return json.dumps({"error": {
        "message": message, "type": "invalid_request_error" if status < 500 else "upstream_error",
        "param": None, "code": str(status), "source": "worker"}}).encode()
