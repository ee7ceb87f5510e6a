"""Schedule: where an admitted request waits for its turn at a model.

One `Gate` per model, behind a narrow seam: `acquire` (wait for a slot, or QueueFull, which
`Gate.overloaded` turns into the client's 429) and `release`. Today a gate is first come, first served with `max_inflight` slots and at
most `max_queue` waiters; a scheduler that orders waiters by tenant or priority replaces
the gate's insides, not its callers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from typing import Protocol

from node.errors import RateLimited

QUEUE_WAIT_S = 30.0


class ModelInfoLike(Protocol):
    """What the schedule reads of a model's settings."""

    max_inflight: int
    max_queue: int


class QueueFull(Exception):
    """A model's in-flight slots and its queue are all taken."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


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
    """The gates of every configured model."""

    def __init__(self, models: Mapping[str, ModelInfoLike], wait_s: float = QUEUE_WAIT_S) -> None:
        self.wait_s = wait_s
        self.gates = {name: Gate(m.max_inflight, m.max_queue) for name, m in models.items()}

    def set_models(self, models: Mapping[str, ModelInfoLike]) -> None:
        """New model settings (config reload); a model's gate is kept, with its new limits, while it stays."""
        gates = {}
        for name, m in models.items():
            gate = self.gates.get(name) or Gate(m.max_inflight, m.max_queue)
            gate.max_inflight, gate.max_queue = m.max_inflight, m.max_queue
            gates[name] = gate
        self.gates = gates

    def gate(self, model: str) -> Gate:
        """The model's gate (the model is configured: admission checked it)."""
        return self.gates[model]

    def busy(self, model: str) -> bool:
        """Whether requests for `model` are in flight or queued."""
        gate = self.gates.get(model)
        return gate is not None and gate.busy
