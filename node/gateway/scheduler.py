"""The scheduler: per model, the replicas' slots and the requests waiting for them, in fair order.

A replica takes at most its `concurrency` requests at once; the rest wait here, so the
order of service is the node's (node/gateway/fairqueue.py), not the worker's. `enter`
returns a `Slot` on one replica (the least busy with a free slot) or waits for one;
`Slot.leave` hands it to the next waiter in fair order. When nothing waits and a slot
is free, `enter` takes it at once: no tenant lookup, no cost estimate, one allocation.

Batch fills idle capacity: a batch-priority request takes a slot only when no interactive
request of the model is in flight and none has been for `batch_yield_s` (a client sending
one request after another keeps the model to itself), except that batch keeps its
`batch_min_share` of the model's slot time (over about the last ten seconds) even then,
one request at a time. The node's own batch lines taken while interactive traffic was quiet are
preempted when an interactive request comes (`preemptible`): stopped at the worker and
queued again, so that request does not share the runtime's forward passes with them.

A request admitted while its model had no ready replica (an on-demand model loading) holds a
slot without a replica; once the model is ready, `bind` places it on a replica with a free
slot, in the order they came, before any request that came later: the first burst after
a load gets the replicas' `concurrency` like any other.

Bounded waiting: past `max_queue` waiters of the model, or past `max_queued` of one
tenant, a request is refused at once (429); a waiter whose `queue_timeout_s` runs out
gets a 503; a waiter whose client goes away (its task cancelled) leaves at once.
All of it runs on the event loop (no locks).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from node.errors import NodeError, RateLimited
from node.gateway.fairqueue import FairQueue, Priority, Ticket
from node.gateway.tenancy import Tenancy
from node.workers.router import Router
from node.workers.router import WorkerView as Target

DEFAULT_MAX_TOKENS = 256   # the cost of a request that names no max_tokens
TEAM_LABELS = 32           # teams with a label of their own in infernode_team_inflight; later ones are "other"
BYTES_PER_TOKEN = 4        # the prompt's estimate: its body's bytes over this
SHARE_WINDOW_S = 10.0      # batch's floor of slot time is kept over about this many seconds (a decaying sum)


class QueueFull(Exception):
    """A request the model cannot queue; `error` says why (None: the model's own queue is full)."""

    def __init__(self, retry_after: float, error: NodeError | None = None) -> None:
        super().__init__("queue full")
        self.retry_after, self.error = retry_after, error


class QueueTimeout(NodeError):
    """503: the request waited its model's `queue_timeout_s` without getting a slot."""

    status = 503
    type = "service_unavailable"
    code = "queue_timeout"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers={"retry-after": str(max(1, min(60, int(retry_after + 0.999))))})


class Slot:
    """One request's place on a replica (target None: the model had no ready replica; the caller decides)."""

    __slots__ = ("queue", "target", "priority", "gauge", "taken", "quiet", "preempt")

    def __init__(self, queue: ModelQueue, target: Target | None, priority: Priority, gauge: Any,
                 taken: float, quiet: bool = False) -> None:
        self.queue, self.target, self.priority, self.gauge = queue, target, priority, gauge  # gauge: its team's
        self.taken = taken  # time.monotonic() when it was taken
        self.quiet = quiet  # a batch slot taken while interactive traffic was quiet (not under batch's floor)
        self.preempt: Callable[[], None] | None = None

    def release(self, duration_s: float) -> None:
        """Give the slot back: the next waiter in fair order gets it."""
        self.queue.release(self, duration_s)

    leave = release


class ModelQueue:
    """One model's slots and waiters."""

    def __init__(self, model: str, router: Router, slots_of: Callable[[Target], int], *, max_inflight: int = 64,
                 max_queue: int = 256, queue_timeout_s: float = 30.0, max_queued: int | None = None,
                 batch_min_share: float = 0.1, batch_yield_s: float = 0.5, metrics: Any = None) -> None:
        self.model, self.router, self.slots_of = model, router, slots_of
        self.max_inflight, self.max_queue, self.queue_timeout_s = max_inflight, max_queue, queue_timeout_s
        self.fq = FairQueue(batch_min_share, max_queued)
        self.batch_yield_s = batch_yield_s
        self.inflight = 0
        self.fore = 0                           # interactive slots held
        self.batch = 0                          # batch slots held
        self.fore_seen = -math.inf              # when an interactive slot was last taken or given back
        self._slot_s = [0.0, 0.0]               # decaying slot-seconds served: all, batch
        self._slot_t = time.monotonic()
        self._wake: asyncio.TimerHandle | None = None
        self.binding: deque[tuple[asyncio.Future[None], Slot]] = deque()  # slots waiting for a replica
        self._preemptible: set[Slot] = set()
        self.held: dict[str, int] = {}          # replica id -> slots taken
        self._avg_s = 1.0                       # moving average of request time, for Retry-After
        self._teams: dict[str, Any] = {}       # metric children, cached
        self._waits: dict[Priority, Any] = {}
        self.metrics = metrics

    @property
    def queued(self) -> int:
        return len(self.fq)

    def configure(self, *, max_inflight: int, max_queue: int, queue_timeout_s: float, max_queued: int | None,
                  batch_min_share: float, batch_yield_s: float = 0.5) -> None:
        """New limits (config reload); waiters stay where they are."""
        self.max_inflight, self.max_queue, self.queue_timeout_s = max_inflight, max_queue, queue_timeout_s
        self.fq.max_queued, self.fq.batch_min_share = max_queued, batch_min_share
        self.batch_yield_s = batch_yield_s
        self.dispatch()

    def _quiet_in(self, now: float) -> float:
        """Seconds until interactive traffic has been quiet for `batch_yield_s` (≤ 0: it has; inf: some in flight)."""
        return math.inf if self.fore else self.fore_seen + self.batch_yield_s - now

    def batch_may_start(self, now: float) -> bool:
        """Whether a batch request may take a free slot now (see the module's docstring)."""
        if self._quiet_in(now) <= 0:
            return True
        share = self.fq.batch_min_share
        if self.batch or share <= 0:
            return False
        total, batch = self._slot_s
        return batch < share * total

    def _resume_batch(self) -> None:
        """Once interactive traffic has been quiet for `batch_yield_s`, hand waiting batch requests their slots."""
        self._wake = None
        if self.fq.depth(Priority.BATCH) and self.fore == 0:
            if self._quiet_in(time.monotonic()) > 0:
                self._arm()
            else:
                self.dispatch()

    def _arm(self) -> None:
        """Wake waiting batch requests once interactive traffic is quiet (a release re-arms it while some runs)."""
        if self._wake is None and self.fore == 0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # configured before the loop runs: the next release dispatches
                return
            self._wake = loop.call_later(max(0.0, self._quiet_in(time.monotonic())), self._resume_batch)

    def _free(self) -> Target | None | Literal[False]:
        """The least busy ready replica with a free slot; None when none is ready; False when all are full."""
        ready = self.router.ready(self.model)
        if not ready:
            return None
        best: Target | Literal[False] = False
        held = self.held
        best_n = 0
        for t in ready:
            n = held.get(t.id, 0)
            if n < self.slots_of(t) and (best is False or n < best_n):
                best, best_n = t, n
        return best

    def _take(self, target: Target | None, priority: Priority, team: str) -> Slot:
        self.inflight += 1
        now = time.monotonic()
        quiet = False
        if priority is Priority.BATCH:
            self.batch += 1
            quiet = self._quiet_in(now) <= 0
        else:
            self.fore += 1
            self.fore_seen = now
        if target is not None:
            self.held[target.id] = self.held.get(target.id, 0) + 1
        gauge = self._gauge(team) if self.metrics is not None else None
        if gauge is not None:
            gauge.inc()
        return Slot(self, target, priority, gauge, now, quiet)

    async def enter(self, key: Any, tenancy: Tenancy, body: dict, size: int, lower: bool = False,
                    wait_s: float | None = None) -> Slot:
        """A slot for one request of `key` (body: its JSON, size: its bytes); waits in fair order, or QueueFull.

        `wait_s`: how long it may wait, when not the model's `queue_timeout_s` (a batch line's)."""
        team = key.team or ""
        if not self.fq.size and self.inflight < self.max_inflight:
            prio = Priority.BATCH if lower else tenancy.of(key)[2]
            if self._preemptible and prio is not Priority.BATCH:
                self._preempt()
            if prio is not Priority.BATCH or self.batch_may_start(time.monotonic()):
                target = self._free()
                if target is not False:  # the fast path: nothing waits and a slot is free
                    self._observe(prio, 0.0)
                    return self._take(target, prio, team)
        tenant, share, prio = tenancy.of(key)
        if lower:
            prio = Priority.BATCH  # a request may lower its priority, never raise it
        elif self._preemptible and prio is not Priority.BATCH:
            self._preempt()  # the slots it waits for are freed as the preempted lines stop
        if len(self.fq) >= self.max_queue:
            raise QueueFull(self.retry_after())
        if self.fq.full_for(tenant):
            wait = self.retry_after()
            raise QueueFull(wait, RateLimited(
                f"{'team' if key.team else 'this key'} already has {self.fq.max_queued} requests waiting for "
                f"model '{self.model}'; retry later", retry_after=wait, reason="tenant_queue", code="tenant_queue_full"))
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        t = Ticket(tenant, key.id, prio, cost(body, size), share, time.monotonic(), (fut, team))
        self.fq.push(t)
        self._depth(prio)
        if self.fq.depth(Priority.BATCH) == self.fq.size - (prio is not Priority.BATCH):
            self.dispatch()  # only yielding batch waited: a slot may be free (a batch one arms the wake-up)
        try:
            async with asyncio.timeout(wait_s or self.queue_timeout_s):
                slot = await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                fut.result().leave(0.0)  # the slot was handed over as we gave up: pass it on
            elif self.fq.remove(t):
                self._depth(prio)
            if isinstance(exc, TimeoutError):
                wait = self.retry_after()
                raise QueueFull(wait, QueueTimeout(
                    f"model '{self.model}' is busy: the request waited {wait_s or self.queue_timeout_s:g} s for a slot",
                    retry_after=wait)) from None
            raise
        self._observe(prio, time.monotonic() - t.arrived)
        return slot

    async def bind(self, slot: Slot, wait_s: float | None = None) -> None:
        """Place a slot taken without a replica on one that has a free slot, waiting for it in arrival order.

        Returns at once when the model still has no ready replica (the caller routes as it
        would have); a 503 `queue_timeout` after `wait_s` (else `queue_timeout_s`).
        """
        if slot.target is not None:
            return
        target = self._free()
        if target is None:
            return
        if target is not False and not self.binding:
            self._place(slot, target)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, slot)
        self.binding.append(entry)
        if target is not False:
            self.dispatch()  # a slot is free: the ones ahead of this take it first
        try:
            async with asyncio.timeout(wait_s or self.queue_timeout_s):
                await fut
        except BaseException as exc:
            if not fut.done():
                self.binding.remove(entry)
            if isinstance(exc, TimeoutError) and slot.target is None:
                raise QueueTimeout(f"model '{self.model}' is busy: the request waited "
                                   f"{wait_s or self.queue_timeout_s:g} s for a slot after it loaded",
                                   retry_after=self.retry_after()) from None
            if slot.target is None:
                raise

    def preemptible(self, slot: Slot, stop: Callable[[], None]) -> None:
        """`stop` ends the request holding `slot` (a batch line of the node's own) when an interactive one comes.

        Only a slot taken while interactive traffic was quiet: one batch holds under its floor is kept.
        """
        if slot.priority is Priority.BATCH and slot.quiet and slot.target is not None:
            slot.preempt = stop
            self._preemptible.add(slot)

    def _preempt(self) -> None:
        slots, self._preemptible = self._preemptible, set()
        for slot in slots:
            stop, slot.preempt = slot.preempt, None
            if stop is not None:
                stop()

    def _place(self, slot: Slot, target: Target) -> None:
        slot.target = target
        self.held[target.id] = self.held.get(target.id, 0) + 1

    def release(self, slot: Slot, duration_s: float) -> None:
        """Give a slot back, then hand free slots to waiters."""
        now = time.monotonic()
        if duration_s:
            self._avg_s += (duration_s - self._avg_s) * 0.05
        held = now - slot.taken  # slot time (duration_s counts the wait for it too)
        decay = math.exp((self._slot_t - now) / SHARE_WINDOW_S)
        served = self._slot_s
        served[0] = served[0] * decay + held
        served[1] = served[1] * decay + (held if slot.priority is Priority.BATCH else 0.0)
        self._slot_t = now
        self.inflight -= 1
        if slot.priority is Priority.BATCH:
            self.batch -= 1
            if slot.preempt is not None:
                slot.preempt = None
                self._preemptible.discard(slot)
        else:
            self.fore -= 1
            self.fore_seen = now
        target = slot.target
        if target is not None:
            self.held[target.id] -= 1  # (entries stay: one per replica id the model has had)
        if slot.gauge is not None:
            slot.gauge.dec()
        if self.fq.size or self.binding:
            self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiters in fair order (after a release, a replica becoming ready, a reload)."""
        binding = self.binding
        while binding:  # slots taken while the model loaded go first: they came before any waiter
            target = self._free()
            if not target:
                return
            fut, slot = binding.popleft()
            if not fut.done():
                self._place(slot, target)
                fut.set_result(None)
        fq = self.fq
        while fq and self.inflight < self.max_inflight:
            target = self._free()
            if target is False:
                return
            t = fq.pop(batch=self.batch_may_start(time.monotonic()))
            if t is None:  # only batch waits, and it yields for now
                self._arm()
                return
            self._depth(t.priority)
            fut, team = t.payload
            if not fut.done():  # a cancelled waiter is removed at once; this is belt and braces
                fut.set_result(self._take(target, t.priority, team))

    def overloaded(self, model: str, retry_after: float) -> RateLimited:
        """429 model_overloaded with the x-ratelimit-* headers of the model's capacity."""
        return RateLimited(
            f"model '{model}' is at capacity ({self.max_inflight} in flight, {self.queued} queued); retry later",
            retry_after=retry_after, reason="model_capacity", code="model_overloaded", headers={
                "x-ratelimit-limit-requests": str(self.max_inflight + self.max_queue),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{max(1, min(60, int(retry_after + 0.999)))}s"})

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the line ahead drained at the measured pace."""
        ready = self.router.ready(self.model)
        slots = sum(self.slots_of(t) for t in ready) if ready else 1
        return max(1.0, (len(self.fq) + 1) * self._avg_s / max(1, min(slots, self.max_inflight)))

    def waiting(self, limit: int) -> list[dict[str, Any]]:
        """Who waits, per tenant and band: at most `limit` rows, the longest lines first."""
        now = time.monotonic()
        rows: dict[tuple[str, Priority], dict[str, Any]] = {}
        for t in self.fq.waiting():
            row = rows.get((t.tenant, t.priority))
            if row is None:
                row = rows[(t.tenant, t.priority)] = {"tenant": t.tenant, "priority": t.priority.label,
                                                      "waiting": 0, "oldest_s": 0.0, "keys": set()}
            row["waiting"] += 1
            row["oldest_s"] = max(row["oldest_s"], round(now - t.arrived, 3))
            row["keys"].add(t.key)
        out = sorted(rows.values(), key=lambda r: -r["waiting"])[:limit]
        for r in out:
            r["keys"] = len(r["keys"])
        return out

    # -- metrics (families from node/ops/metrics.py; children cached) -------------------
    def _gauge(self, team: str) -> Any:
        g = self._teams.get(team)
        if g is None:
            if len(self._teams) >= TEAM_LABELS:
                return self._teams.get("\0other") or self._teams.setdefault(
                    "\0other", self.metrics.team_inflight.labels(self.model, "other"))
            g = self._teams[team] = self.metrics.team_inflight.labels(self.model, team or "none")
        return g

    def _depth(self, prio: Priority) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.model, prio.label).set(self.fq.depth(prio))

    def _observe(self, prio: Priority, waited: float) -> None:
        if self.metrics is not None:
            h = self._waits.get(prio)
            if h is None:
                h = self._waits[prio] = self.metrics.queue_wait.labels(self.model, prio.label)
            h.observe(waited)


def cost(body: dict, size: int) -> float:
    """Tokens a request asks for: its prompt's estimate (from its size) plus its max_tokens."""
    n = body.get("max_tokens")
    if n is None:
        n = body.get("max_completion_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        n = DEFAULT_MAX_TOKENS
    return size / BYTES_PER_TOKEN + min(n, 1 << 20)


class Scheduler:
    """Every model's queue; wakes a model's waiters when the router says its replicas changed."""

    def __init__(self, router: Router, *, slots_of: Callable[[Target], int] = lambda t: 1 << 30,
                 tenancy: Tenancy | None = None, batch_min_share: float = 0.1, batch_yield_s: float = 0.5,
                 metrics: Any = None) -> None:
        self.router, self.slots_of, self.metrics = router, slots_of, metrics
        self.tenancy = tenancy or Tenancy()
        self.batch_min_share, self.batch_yield_s = batch_min_share, batch_yield_s
        self.queues: dict[str, ModelQueue] = {}
        router.on_ready = self.poke

    def set_models(self, limits: dict[str, tuple[int, int, float, int | None]]) -> dict[str, ModelQueue]:
        """Queues for these models: name -> (max_inflight, max_queue, queue_timeout_s, max_queued); kept while they stay."""
        queues = {}
        for name, (inflight, queue, timeout_s, queued) in limits.items():
            q = self.queues.get(name) or ModelQueue(name, self.router, self.slots_of, metrics=self.metrics)
            q.configure(max_inflight=inflight, max_queue=queue, queue_timeout_s=timeout_s, max_queued=queued,
                        batch_min_share=self.batch_min_share, batch_yield_s=self.batch_yield_s)
            queues[name] = q
        self.queues = queues
        return queues

    def poke(self, model: str) -> None:
        """A model's replicas changed: free slots may have appeared."""
        q = self.queues.get(model)
        if q is not None and (q.fq or q.binding):
            q.dispatch()
