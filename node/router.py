"""The router: a read-only view of ready replicas, picking the least busy one."""

from __future__ import annotations

from typing import Iterable, Protocol


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

    def set_models(self, models: Iterable[str]) -> None:
        models = list(models)
        self._ready = {m: self._ready.get(m, []) for m in models}
        self.context = {m: self.context.get(m) for m in models}

    def set_ready(self, model: str, targets: list[Target]) -> None:
        if model in self._ready:
            self._ready = {**self._ready, model: list(targets)}

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
