"""The router: a read-only view of ready replicas, picking the least busy one; and per-model backpressure."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol


class Target(Protocol):
    """What the gateway needs of a replica."""

    id: str
    inflight: int

    @property
    def openai_base(self) -> str: ...


class Router:
    """Which replicas of which model are ready; updated by the supervisor."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        self._ready: dict[str, list[Target]] = {m: [] for m in models}
        self.context: dict[str, int | None] = {m: None for m in models}
        self.on_ready: Callable[[str], None] | None = None  # told after a model's ready set changes (the scheduler)

    def set_models(self, models: Iterable[str]) -> None:
        models = list(models)
        self._ready = {m: self._ready.get(m, []) for m in models}
        self.context = {m: self.context.get(m) for m in models}

    def set_ready(self, model: str, targets: Sequence[Target]) -> None:
        if model in self._ready:
            self._ready = {**self._ready, model: list(targets)}
            if self.on_ready is not None:
                self.on_ready(model)

    def known(self, model: str) -> bool:
        return model in self._ready

    def models(self) -> list[str]:
        return list(self._ready)

    def ready(self, model: str) -> list[Target]:
        return self._ready.get(model, [])

    def pick(self, model: str, exclude: Target | None = None) -> Target | None:
        """The ready replica with the fewest requests in flight (None if none)."""
        best: Target | None = None
        for t in self._ready.get(model, ()):
            if t is exclude:
                continue
            if best is None or t.inflight < best.inflight:
                best = t
        return best


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

    async def enter(self, wait_s: float) -> None:
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
                self.leave(0.0)  # the slot was handed over as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if isinstance(exc, asyncio.TimeoutError):
                raise QueueFull(self.retry_after()) from None
            raise

    def leave(self, duration_s: float) -> None:
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
