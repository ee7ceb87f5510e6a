"""Teams: a name carrying the same limits and budget as a key, shared by all its keys."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class TeamRecord:
    """A team as stored; its limits apply to the sum of its keys' traffic."""

    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_period: str = "day"
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    plan: str | None = None
    budget_usd: float | None = None
    share: float | None = None       # weight in the fair order between tenants
    priority: str | None = None      # "interactive" | "batch"

    def public(self) -> dict[str, Any]:
        """The record as the admin API shows it."""
        return asdict(self)

    def updated(self, **changes: Any) -> TeamRecord:
        return replace(self, **changes, updated_at=time.time())
