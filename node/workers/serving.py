"""What the gateway may know of a replica (node/workers/router.py's WorkerView), read from its launch plan.

The gateway reads these and tells a replica only when a request to it begins and ends;
it never writes a replica's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtimes import Dialect, LaunchPlan


class Serving:
    """A replica as the gateway sees it (mixed into Replica, which sets `id` and `plan`)."""

    id: str
    plan: LaunchPlan | None
    _inflight: int = 0

    @property
    def inflight(self) -> int:
        """Requests in flight to it."""
        return self._inflight

    def begin(self) -> None:
        """A request to it starts."""
        self._inflight += 1

    def end(self) -> None:
        """A request to it ended."""
        self._inflight -= 1

    @property
    def openai_base(self) -> str:
        assert self.plan is not None
        return self.plan.openai_base

    @property
    def stream_usage(self) -> bool:
        return bool(self.plan and self.plan.stream_usage)

    @property
    def upstream_model(self) -> str | None:
        return self.plan.upstream_model if self.plan else None

    @property
    def uuid_request_ids(self) -> bool:
        return bool(self.plan and self.plan.uuid_request_ids)

    @property
    def upstream_headers(self) -> tuple[tuple[str, str], ...]:
        return self.plan.headers if self.plan else ()

    @property
    def dialect(self) -> Dialect | None:
        return self.plan.dialect if self.plan and not self.plan.dialect.native else None

    @property
    def concurrency(self) -> int:
        """Requests it serves well at once (the node sends no more)."""
        return (self.plan.concurrency if self.plan else None) or 1 << 30  # None: no cap but max_inflight

    @property
    def priorities(self) -> Mapping[str, int] | None:
        """The body's `priority` per band, where its runtime schedules by it."""
        return self.plan.priorities if self.plan else None

    @property
    def keeps_stream_connections(self) -> bool:
        return not self.plan or self.plan.keeps_stream_connections

    def serves_api(self, api: str) -> bool:
        return bool(self.plan and api in self.plan.native_apis)

    def cannot(self, endpoint: str) -> str | None:
        return self.plan.cannot.get(endpoint) if self.plan else None
