"""The router: a read-only view of ready replicas, picking the least busy one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from runtimes import Dialect


class WorkerView(Protocol):
    """What the gateway may know of a ready replica, and the only thing it may tell it (begin/end of a request)."""

    @property
    def id(self) -> str: ...

    @property
    def inflight(self) -> int:
        """Requests in flight to it (what least-outstanding routing compares)."""

    @property
    def openai_base(self) -> str:
        """Where its /v1 traffic goes (no trailing slash)."""

    @property
    def stream_usage(self) -> bool:
        """Whether its streams carry a usage chunk when asked for one."""

    @property
    def upstream_model(self) -> str | None:
        """The model name it expects, when it differs from the configured one."""

    @property
    def uuid_request_ids(self) -> bool:
        """Whether it rejects an x-request-id that is not a UUID."""

    @property
    def upstream_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers sent with every request to it (e.g. an external server's key)."""

    @property
    def dialect(self) -> Dialect | None:
        """Where its runtime's chat/completions dialect differs from OpenAI's; None when it does not."""

    @property
    def concurrency(self) -> int:
        """Requests it serves well at once: the scheduler sends it no more."""

    @property
    def priorities(self) -> Mapping[str, int] | None:
        """The body's `priority` per band ("interactive", "batch") where its runtime schedules by it, else None."""

    @property
    def keeps_stream_connections(self) -> bool:
        """Whether its connection may be reused after a streamed answer."""

    def serves_api(self, api: str) -> bool:
        """Whether it serves that client API (e.g. "responses") itself."""

    def cannot(self, endpoint: str) -> str | None:
        """Why it cannot serve that OpenAI endpoint, with the fix; None when it can."""

    def begin(self) -> None:
        """A request to it starts (counted from before the connection, for routing and idle timers)."""

    def end(self) -> None:
        """A request to it ended, however it ended."""


class Router:
    """Which replicas of which model are ready; updated by the supervisor."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        self._ready: dict[str, list[WorkerView]] = {m: [] for m in models}
        self.context: dict[str, int | None] = {m: None for m in models}
        self.on_ready: Callable[[str], None] | None = None  # told after a model's ready set changes (the scheduler)

    def set_models(self, models: Iterable[str]) -> None:
        models = list(models)
        self._ready = {m: self._ready.get(m, []) for m in models}
        self.context = {m: self.context.get(m) for m in models}

    def set_ready(self, model: str, targets: Sequence[WorkerView]) -> None:
        if model in self._ready:
            self._ready = {**self._ready, model: list(targets)}
            if self.on_ready is not None:
                self.on_ready(model)

    def known(self, model: str) -> bool:
        return model in self._ready

    def models(self) -> list[str]:
        return list(self._ready)

    def ready(self, model: str) -> list[WorkerView]:
        return self._ready.get(model, [])

    def pick(self, model: str, exclude: WorkerView | None = None) -> WorkerView | None:
        """The ready replica with the fewest requests in flight (None if none)."""
        best: WorkerView | None = None
        for t in self._ready.get(model, ()):
            if t is exclude:
                continue
            if best is None or t.inflight < best.inflight:
                best = t
        return best
