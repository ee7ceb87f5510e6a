"""Plans: named sets of models, limits and budgets that keys and teams take by name.

A key (or team) with `plan = "NAME"` gets the plan's value for every field it does
not set itself. Plans come from `[plans.NAME]` in appliance.toml and from the admin
API (stored); a stored plan of the same name overrides the file's. `models` holds
model names and `group:NAME` references to `[model_groups]`, expanded when limits
are built (off the request path).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

GROUP_PREFIX = "group:"
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel", "budget_tokens", "budget_usd")


@dataclass(frozen=True)
class PlanRecord:
    """A plan as stored or configured."""

    name: str
    models: tuple[str, ...] | None = None   # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: str = "day"
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    share: float | None = None
    priority: str | None = None

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models) if self.models is not None else None
        return d

    def updated(self, **changes: Any) -> PlanRecord:
        return replace(self, **changes, updated_at=time.time())


def expand_models(models: Iterable[str] | None, groups: Mapping[str, Iterable[str]]) -> frozenset[str] | None:
    """Model names with every `group:NAME` replaced by the group's members (None: all models)."""
    if models is None:
        return None
    out: set[str] = set()
    for m in models:
        if m.startswith(GROUP_PREFIX):
            out.update(groups.get(m[len(GROUP_PREFIX):], ()))
        else:
            out.add(m)
    return frozenset(out)


@dataclass(frozen=True)
class Effective:
    """The limits that apply to one key or team once its plan is folded in."""

    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_usd: float | None
    budget_period: str


def standing(key: Any, team: Any, key_plan: PlanRecord | None, team_plan: PlanRecord | None) -> tuple[str, float, str]:
    """A key's place in a model's line: (tenant, share, priority).

    The tenant is the key's team (a key without one is its own tenant); share and priority
    are the key's own, else its team's, else its plan's, else its team's plan's, else 1
    and "interactive".
    """
    chain = (key, team, key_plan, team_plan)
    share = next((r.share for r in chain if r is not None and r.share is not None), 1.0)
    priority = next((r.priority for r in chain if r is not None and r.priority is not None), "interactive")
    return (key.team or f"key:{key.id}"), float(share), priority


def effective(own: Any, plan: PlanRecord | None, groups: Mapping[str, Iterable[str]]) -> Effective:
    """`own` (a key or team record) over its plan: a field set on `own` wins.

    The budget period follows whoever sets a budget: the record's own period when it
    sets budget_tokens or budget_usd itself, else the plan's.
    """
    def pick(name: str) -> Any:
        v = getattr(own, name, None)
        return v if v is not None or plan is None else getattr(plan, name)
    own_models = getattr(own, "models", None)
    models = own_models if own_models is not None or plan is None else plan.models
    own_budget = getattr(own, "budget_tokens", None) is not None or getattr(own, "budget_usd", None) is not None
    period = own.budget_period if own_budget or plan is None else plan.budget_period
    return Effective(expand_models(models, groups), pick("rpm"), pick("tpm"), pick("max_parallel"),
                     pick("budget_tokens"), pick("budget_usd"), period)
