"""Call: the worker that answers, and its answer's head.

Down the model's fallback chain, for each model in turn: wait for its turn (schedule),
load it if it is on demand and not ready, pick the least busy ready replica, send, and
retry once on another replica when the connection failed before anything was written.
A model that cannot take the request (not ready, overloaded, unreachable) passes it to
the next fallback; the last one's failure is the client's answer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from node.accounts.quotas import Quotas
from node.errors import InvalidRequest, NoReadyReplica, UpstreamTimeout
from node.gateway.dialect import adapt
from node.gateway.exchange import Admitted, Exchange, ModelInfo, Upstream, WorkerUnreachable
from node.gateway.schedule import Schedule
from node.gateway.scheduler import QueueFull, Slot
from node.gateway.upstream import ConnectFailed, Pool, TimedOut, UpstreamFailure
from node.workers.router import Router, WorkerView

log = logging.getLogger("infernode.gateway")

# OpenAI's endpoints, as the worker's /v1 serves them.
SUBPATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
            "rerank": "/rerank", "score": "/score"}
OPENAI_ENDPOINTS = frozenset(SUBPATHS)
# A batch line (api "batch") may wait this long for a slot, not the model's queue_timeout_s: batch
# yields to interactive traffic, and the runner tries a line that timed out again until its window ends.
BATCH_LINE_WAIT_S = 600.0

EnsureLoaded = Callable[[str], Awaitable[None]]


def chain(models: Mapping[str, ModelInfo], quotas: Quotas, info: ModelInfo, key: Any) -> list[ModelInfo]:
    """The model, then each fallback the key may use, in order."""
    if not info.fallbacks:
        return [info]
    return [info] + [models[f] for f in info.fallbacks if f in models and quotas.allows(key, f)]


def worker_rid(rid: str, target: WorkerView) -> str:
    """The request id for the worker: the client's, unless the runtime insists on a UUID and it is not one."""
    if not target.uuid_request_ids:
        return rid
    try:
        return str(uuid.UUID(rid))
    except ValueError:
        # llama-cpp-python answers 400 to a non-UUID x-request-id; send a stable UUID derived from it.
        wid = str(uuid.uuid5(uuid.NAMESPACE_URL, rid))
        log.info("request %s is %s at the worker", rid, wid)
        return wid


class Caller:
    """Sends admitted requests to workers."""

    def __init__(self, router: Router, client: Pool, schedule: Schedule, quotas: Quotas,
                 ensure_loaded: EnsureLoaded | None = None) -> None:
        self.router, self.client, self.schedule, self.quotas = router, client, schedule, quotas
        # Loads an on-demand model that has no ready replica, or raises NoReadyReplica (node/workers/loader.py).
        self.ensure_loaded = ensure_loaded

    async def call(self, a: Admitted, models: Mapping[str, ModelInfo]) -> tuple[Upstream, Slot]:
        """The answer of the first model in the chain that takes the request, and the slot it holds there.

        The caller releases the slot and ends the target's request once the answer is relayed.
        """
        ex, adm = a.ex, a.adm
        cands = chain(models, self.quotas, a.info, a.key)
        loadable = self.ensure_loaded is not None
        for i, cand in enumerate(cands):
            last = i == len(cands) - 1
            on_demand = cand.on_demand and loadable
            if not last and not on_demand and not self.router.ready(cand.name):
                continue  # not ready: the next fallback
            # The model that serves it is the one the ledger, the metrics and prices name.
            ex.model = adm.model = cand.name
            gate = self.schedule.gate(cand.name)
            try:
                wait_s = BATCH_LINE_WAIT_S if ex.api == "batch" else None
                slot = ex.slot = await gate.enter(a.key, self.schedule.scheduler.tenancy, a.body, len(a.raw), ex.lower,
                                                  wait_s)
                if ex.preempt is not None:
                    gate.preemptible(slot, ex.preempt)
            except QueueFull as full:
                if not last:
                    continue  # overloaded: the next fallback
                raise (full.error or gate.overloaded(cand.name, full.retry_after)) from None
            try:
                if on_demand and not self.router.ready(cand.name):
                    # Holding its slot keeps the model busy, so no other load evicts it before this request is routed.
                    await self.ensure_loaded(cand.name)  # type: ignore[misc]
                if slot.target is None:  # taken while the model had no ready replica: a replica's slot now
                    await gate.bind(slot, wait_s)
                return await self._send(a, cand), slot
            except (WorkerUnreachable, NoReadyReplica) as err:
                slot.release(time.perf_counter() - ex.started)
                if last:
                    raise
                log.warning("request %s: %s; trying the next fallback", ex.client_rid or ex.rid, err.message)
            except BaseException:
                slot.release(time.perf_counter() - ex.started)
                raise
        raise AssertionError("unreachable: the last model of a chain returns or raises")

    async def _send(self, a: Admitted, info: ModelInfo) -> Upstream:
        """Pick a replica and send; one retry on another replica when nothing was written."""
        ex = a.ex
        slot = ex.slot
        target = slot.target if slot is not None and slot.target is not None else self.router.pick(ex.model)
        if target is None:
            raise NoReadyReplica(f"model '{ex.model}' has no ready replica yet", retry_after=5)
        body, wants_usage, native = _body(a, ex, target)
        headers: tuple[tuple[str, str], ...] = (
            ("content-type", "application/json"), ("x-request-id", worker_rid(ex.client_rid or ex.rid, target)))
        extra = target.upstream_headers
        if extra:
            headers += extra
        subpath = a.path.decode()[3:] if a.call is None else SUBPATHS[ex.endpoint]
        for attempt in (0, 1):
            target.begin()  # counted from the request's start, for least-outstanding routing
            try:
                resp = await self.client.request("POST", target.openai_base, subpath, body, headers,
                                                 read_timeout=info.read_timeout_s, connect_timeout=info.connect_timeout_s)
            except ConnectFailed as exc:
                target.end()
                # Nothing reached the client yet: retry once on another replica.
                log.warning("request %s: worker %s unreachable (%s)", ex.rid, target.id, exc)
                other = self.router.pick(ex.model, exclude=target) if attempt == 0 else None
                if other is None:
                    raise WorkerUnreachable(f"the worker for '{ex.model}' is unreachable: {exc}") from None
                target = other
                continue
            except BaseException as exc:
                target.end()
                if isinstance(exc, TimedOut):
                    raise UpstreamTimeout(f"the worker for '{ex.model}' did not answer in time") from None
                if isinstance(exc, UpstreamFailure):
                    raise WorkerUnreachable(f"the worker for '{ex.model}' failed: {exc}") from None
                raise
            return Upstream(resp, target, target.stream_usage, wants_usage, native)
        raise AssertionError("unreachable: the second attempt returns or raises")


def _body(a: Admitted, ex: Exchange, target: WorkerView) -> tuple[bytes, bool, bool]:
    """(the body for this worker, whether the client asked for stream usage, whether the API is passed through natively).

    The body goes unchanged unless the node must ask for stream usage, the worker knows
    the model by another name (or a fallback serves it), or the route translated it.
    """
    req = a.body
    options = req.get("stream_options")
    wants_usage = bool(options and options.get("include_usage"))
    changed = False
    if ex.stream and target.stream_usage and not wants_usage and ex.endpoint in ("chat", "completions"):
        req["stream_options"] = {**(options or {}), "include_usage": True}
        changed = True
    spoken = target.dialect
    if spoken is not None and ex.endpoint in ("chat", "completions") and adapt(req, spoken):
        changed = True
    levels = target.priorities
    if levels and ex.slot is not None:  # the runtime orders by it: the node's band, never the client's
        req["priority"], changed = levels[ex.slot.priority.label], True
    name = target.upstream_model or ex.model
    if name != req.get("model"):  # the worker's own name, or the fallback's
        req["model"] = name
        changed = True
    native = ex.endpoint not in OPENAI_ENDPOINTS  # another API the runtime serves itself, passed through
    if not (changed or a.call is not None or native):
        return a.raw, wants_usage, native
    try:
        return json.dumps(req).encode(), wants_usage, native
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
