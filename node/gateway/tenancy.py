"""Tenancy: whose a request is, and at what weight and band it waits (the scheduler's view of a key)."""

from __future__ import annotations

from typing import Any

from node.accounts.plans import standing
from node.gateway.fairqueue import Priority


class Tenancy:
    """Who a key's request belongs to, (tenant, share, priority), cached per key record.

    With `quotas` (node/accounts/quotas.py) the key's team and plans are read from it
    (node/accounts/plans.py `standing`); a team or plan change empties the cache.
    """

    def __init__(self, quotas: Any = None) -> None:
        self.quotas = quotas
        self._cache: dict[str, tuple[Any, tuple[str, float, Priority]]] = {}
        self._generation = -1

    def of(self, key: Any) -> tuple[str, float, Priority]:
        q = self.quotas
        if q is None:
            return key.team or f"key:{key.id}", 1.0, Priority.INTERACTIVE
        if self._generation != q.generation or len(self._cache) > 100_000:
            self._cache, self._generation = {}, q.generation
        hit = self._cache.get(key.id)
        if hit is not None and hit[0] is key:  # records are immutable: the same object, the same answer
            return hit[1]
        team = q.team(key.team) if key.team else None
        tenant, share, prio = standing(key, team, q.plan(key.plan), q.plan(team.plan) if team is not None else None)
        out = (tenant, share, Priority.parse(prio) or Priority.INTERACTIVE)
        self._cache[key.id] = (key, out)
        return out
