"""What a key may still do: its limits (plans folded in) and what remains of them, for /v1/me."""

from __future__ import annotations

import time
from typing import Any

from node.accounts.counters import WINDOW
from node.accounts.keys import KeyRecord
from node.accounts.quotas import Limits, Quotas, day_id, next_month_start


def _scope(quotas: Quotas, lim: Limits, name: str, now: float) -> dict[str, Any]:
    c = quotas.counter(lim.label, name)
    c.prune(now)
    tokens, usd = quotas.used(lim.label, name, lim.budget_period, now)
    reset = next_month_start(now) if lim.budget_period == "month" else (day_id(now) + 1) * 86400.0

    def left(limit: float | None, used: float) -> float | None:
        return None if limit is None else max(0, limit - used)
    return {
        "rpm": lim.rpm, "remaining_requests": left(lim.rpm, len(c.hits)),
        "tpm": lim.tpm, "remaining_tokens": left(lim.tpm, c.token_sum),
        "max_parallel": lim.max_parallel, "in_flight": c.parallel,
        "budget_period": lim.budget_period, "budget_resets_at": reset,
        "budget_tokens": lim.budget_tokens, "used_tokens": tokens,
        "remaining_budget_tokens": left(lim.budget_tokens, tokens),
        "budget_usd": lim.budget_usd, "spent_usd": round(usd, 6),
        "remaining_budget_usd": None if lim.budget_usd is None else round(max(0.0, lim.budget_usd - usd), 6),
        "window_s": WINDOW,
    }


def standing(quotas: Quotas, key: KeyRecord, models: list[str], now: float | None = None) -> dict[str, Any]:
    """The key's id, name, team, plan, the models it may use, and each scope's limits and what remains."""
    now = time.time() if now is None else now
    limits = quotas.limits_of(key)
    scopes = {lim.label: _scope(quotas, lim, key.id if lim.label == "key" else key.team or "", now) for lim in limits}
    return {
        "object": "key", "id": key.id, "name": key.name, "team": key.team, "plan": key.plan,
        "expires_at": key.expires_at, "models": [m for m in models if quotas.allows(key, m)],
        "limits": scopes,
    }
