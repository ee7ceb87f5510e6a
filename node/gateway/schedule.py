"""Schedule: where an admitted request waits for its turn at a model.

One queue per model (node/gateway/scheduler.py's ModelQueue), behind a narrow seam: `enter`
(a slot on one replica, waiting in fair order between tenants, or QueueFull, which
`overloaded` turns into the client's 429) and the slot's `release`. `Gate`, the first come,
first served gate it replaced, stays for what needs a plain FIFO line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from typing import Protocol

from node.errors import RateLimited
from node.gateway.scheduler import ModelQueue, QueueFull, Scheduler

QUEUE_WAIT_S = 30.0


class ModelInfoLike(Protocol):
    """What the schedule reads of a model's settings."""

    max_inflight: int
    max_queue: int
    queue_timeout_s: float
    max_queued: int | None


class Gate:
    """Backpressure for one model: `max_inflight` slots, then at most `max_queue` waiters (FIFO)."""

    def __init__(self, max_inflight: int, max_queue: int) -> None:
        self.max_inflight, self.max_queue = max_inflight, max_queue
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._avg_s = 1.0  # moving average of request time, for Retry-After

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        """Requests hold or wait for a slot (then the model is not evicted)."""
        return self.inflight > 0 or bool(self._waiters)

    async def acquire(self, wait_s: float) -> None:
        """Take a slot, waiting in line up to wait_s; QueueFull when the line is full or too slow."""
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(self.retry_after())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release(0.0)  # the slot was handed over as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if isinstance(exc, asyncio.TimeoutError):
                raise QueueFull(self.retry_after()) from None
            raise

    def release(self, duration_s: float) -> None:
        """Give the slot back, or hand it straight to the next waiter."""
        if duration_s:
            self._avg_s += (duration_s - self._avg_s) * 0.05
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue ahead drained at the measured pace."""
        return (len(self._waiters) + 1) * self._avg_s / max(1, self.max_inflight)

    def overloaded(self, model: str, retry_after: float) -> RateLimited:
        """429 model_overloaded with the x-ratelimit-* headers of the model's capacity."""
        return RateLimited(
            f"model '{model}' is at capacity ({self.max_inflight} in flight, {self.queued} queued); retry later",
            retry_after=retry_after, reason="model_capacity", code="model_overloaded", headers={
                "x-ratelimit-limit-requests": str(self.max_inflight + self.max_queue),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{max(1, min(60, int(retry_after + 0.999)))}s"})


class Schedule:
    """Every configured model's queue (node/gateway/scheduler.py: replica slots, fair order between tenants)."""

    def __init__(self, models: Mapping[str, ModelInfoLike], scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.gates = scheduler.set_models(_limits(models))

    def set_models(self, models: Mapping[str, ModelInfoLike]) -> None:
        """New model settings (config reload); a model's queue is kept, with its new limits, while it stays."""
        self.gates = self.scheduler.set_models(_limits(models))

    def gate(self, model: str) -> ModelQueue:
        """The model's queue (the model is configured: admission checked it)."""
        return self.gates[model]

    def busy(self, model: str) -> bool:
        """Whether requests for `model` are in flight or queued."""
        q = self.gates.get(model)
        return q is not None and (q.inflight > 0 or q.queued > 0)


def _limits(models: Mapping[str, ModelInfoLike]) -> dict[str, tuple[int, int, float, int | None]]:
    return {n: (m.max_inflight, m.max_queue, m.queue_timeout_s, m.max_queued) for n, m in models.items()}
