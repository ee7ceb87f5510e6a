"""Schedule: where an admitted request waits for its turn at a model.

One queue per model (node/gateway/scheduler.py's ModelQueue), behind a narrow seam: `enter`
(a slot on one replica, waiting in fair order between tenants, or QueueFull, which
`overloaded` turns into the client's 429) and the slot's `release`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from node.gateway.scheduler import ModelQueue, Scheduler

QUEUE_WAIT_S = 30.0


class ModelInfoLike(Protocol):
    """What the schedule reads of a model's settings."""

    max_inflight: int
    max_queue: int
    queue_timeout_s: float
    max_queued: int | None


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
