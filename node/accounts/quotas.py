"""Admission on the hot path: key validity, allowed models and limits, all in memory.

`Quotas.admit` runs before a request is proxied and either raises (401/403/429) or
returns an `Admission` whose `finish` charges what the worker reported.

Semantics (see docs/keys-and-quotas.md):
- requests per minute are exact, by a sliding-window log: a request is admitted when
  fewer than `rpm` requests were admitted in the 60 seconds before it. Every admitted
  request counts, whatever its outcome.
- tokens per minute and budgets are checked before (is anything left?) and charged
  after, from the worker's reported usage, when the request ends. A request admitted
  with one token left runs to completion, so a limit can be overshot by what the
  requests in flight at that moment produce; the next request is refused.
- budgets count prompt + completion tokens (budget_tokens) or money (budget_usd, from
  the model's price_input/price_output per million tokens) in the current UTC day or
  month; the same rule holds: admitted while anything is left, charged at the end, so
  the request that crosses a budget completes and the next one is refused.
- plans: a key or team with a plan takes the plan's value for every limit it does not
  set itself, and the plan's models (with `group:NAME` expanded) unless it lists its own.
- scopes: the key; its team (the team's limits are shared by all its keys); and, when
  the key sets user_rpm/user_tpm, each end user (the request's `user` field) under it
  (at most endusers.MAX_PER_KEY per key, least recently used out).
"""

from __future__ import annotations

import calendar
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from node.accounts.counters import WINDOW, Counter
from node.accounts.endusers import EndUsers
from node.accounts.keys import KeyRecord
from node.accounts.plans import PlanRecord, effective
from node.accounts.teams import TeamRecord
from node.errors import AuthenticationError, PermissionDenied, RateLimited

WHO = {"key": "this key", "team": "this key's team", "user": "this end user"}


@dataclass(frozen=True)
class Limits:
    """The limits of one scope for one request."""

    label: str                    # key | team | user: named in messages and metrics
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_period: str
    budget: bool                  # charge budget counters in this scope
    budget_usd: float | None = None


class UsageLike(Protocol):
    """What a ledger row gives the rebuild."""

    ts: float
    key_id: str | None
    team: str | None
    end_user: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float | None


def day_id(now: float) -> int:
    return int(now // 86400)


def month_start(now: float) -> float:
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


def next_month_start(now: float) -> float:
    t = time.gmtime(now)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((y, m, 1, 0, 0, 0)))


@dataclass(slots=True)
class Admission:
    """One admitted request; `finish` must be called exactly once."""

    quotas: Quotas
    key: KeyRecord
    model: str                    # the model charged: set to the one that served it (fallbacks)
    wire_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # x-ratelimit-*, as sent
    scopes: list[tuple[Counter, Limits]] = field(default_factory=list)
    batch: bool = False           # a batch line: charged to budgets only, never to rate windows or parallel
    _done: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.wire_headers}

    def finish(self, prompt_tokens: int, completion_tokens: int, now: float | None = None,
               cost: float | None = None) -> None:
        """Charge the worker's reported usage and release the parallel slot (`cost`: already priced by the caller)."""
        if self._done:
            return
        self._done = True
        now = time.time() if now is None else now
        prompt_tokens, completion_tokens = max(0, prompt_tokens), max(0, completion_tokens)
        if cost is None:
            price = self.quotas.prices.get(self.model)
            cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6 if price else 0.0
        self.quotas._finish(self, prompt_tokens + completion_tokens, cost, now)


class Quotas:
    """Per-key, per-team and per-end-user limits held in memory (event loop only, no locks)."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, ...], Counter] = {}   # key and team scopes
        self._users = EndUsers()                                # end-user scopes, bounded per key
        self.prices: dict[str, tuple[float, float]] = {}   # model -> USD per million (input, output)
        self._teams: dict[str, TeamRecord] = {}
        self._plan_records: dict[str, PlanRecord] = {}
        self._groups: dict[str, tuple[str, ...]] = {}
        # key id -> (the record it was built for, its key and team scopes, the models it may
        # use): records are immutable, so an identity check tells when a key changed; a
        # team or plan change clears it all.
        self._plans: dict[str, tuple[KeyRecord, list[tuple[Counter, Limits]], frozenset[str] | None]] = {}
        self._day = -1
        self._month = -1

    # -- configuration -----------------------------------------------------------
    def set_teams(self, teams: Iterable[TeamRecord], plans: Mapping[str, PlanRecord] | None = None,
                  groups: Mapping[str, Iterable[str]] | None = None) -> None:
        """Teams, plans and model groups changed: limits are rebuilt at each key's next request."""
        self._teams = {t.name: t for t in teams}
        if plans is not None:
            self._plan_records = dict(plans)
        if groups is not None:
            self._groups = {g: tuple(m) for g, m in groups.items()}
        self._plans = {}

    def teams(self) -> list[TeamRecord]:
        return list(self._teams.values())

    def set_prices(self, prices: Mapping[str, tuple[float, float]]) -> None:
        """Model prices (USD per million input and output tokens) that money budgets charge."""
        self.prices = dict(prices)

    def team(self, name: str) -> TeamRecord | None:
        return self._teams.get(name)

    def counter(self, *scope: str) -> Counter:
        c = self._counters.get(scope)
        if c is None:
            c = self._counters[scope] = Counter()
        return c

    def _periods(self, now: float) -> tuple[int, int]:
        day = day_id(now)
        if day != self._day:
            t = time.gmtime(now)
            self._day, self._month = day, t.tm_year * 12 + t.tm_mon
        return self._day, self._month

    # -- the hot path ------------------------------------------------------------
    def admit(self, key: KeyRecord, model: str | None = None, user: str | None = None,
              now: float | None = None, lane: str | None = None) -> Admission:
        """Admit one request or raise AuthenticationError, PermissionDenied or RateLimited.

        The gateway admits before it reads the body (model None, no end user), so every
        authenticated request counts, then calls `check_model` and `admit_user` once decoded.
        """
        now = time.time() if now is None else now
        if key.revoked:
            raise AuthenticationError("this API key has been revoked", code="key_revoked")
        if key.expired(now):
            raise AuthenticationError("this API key has expired", code="key_expired")
        if model is not None:
            self.check_model(key, model)
        cached = self._plans.get(key.id)
        plan = list(cached[1] if cached is not None and cached[0] is key else self._key_plan(key)[1])
        day, month = self._periods(now)
        if lane == "batch":  # a batch line: budgets apply; rpm, tpm and parallel do not (the scheduler paces it)
            for c, lim in plan:
                c.roll(day, month)
                self._check(c, replace(lim, rpm=None, tpm=None, max_parallel=None), now, plan)
            return Admission(self, key, model or "", [], plan, batch=True)
        for c, lim in plan:
            c.prune(now)
            c.roll(day, month)
            self._check(c, lim, now, plan)
        for c, _ in plan:
            c.hits.append(now)
            c.parallel += 1
        adm = Admission(self, key, model or "", _headers(plan, now), plan)
        if user:
            try:
                self.admit_user(adm, user, now)
            except RateLimited:
                adm.finish(0, 0, now)  # the key's parallel slot back; the attempt still counts against its rpm
                raise
        return adm

    def check_model(self, key: KeyRecord, model: str) -> None:
        """Raise PermissionDenied when the key (its own models, else its plan's) may not use the model."""
        if not self.allows(key, model):
            raise PermissionDenied(f"this API key may not use model '{model}'", param="model")

    def admit_user(self, adm: Admission, user: str, now: float | None = None) -> None:
        """Add the end user's scope (`user` field) to an admitted request, or raise RateLimited."""
        key = adm.key
        if adm.batch or (key.user_rpm is None and key.user_tpm is None):
            return
        now = time.time() if now is None else now
        c = self._users.counter(key.id, user)
        lim = Limits("user", key.user_rpm, key.user_tpm, None, None, "day", False)
        plan = adm.scopes + [(c, lim)]
        day, month = self._periods(now)
        c.prune(now)
        c.roll(day, month)
        self._check(c, lim, now, plan)
        c.hits.append(now)
        c.parallel += 1
        adm.scopes = plan
        adm.wire_headers = _headers(plan, now)

    def allows(self, key: KeyRecord, model: str) -> bool:
        """Whether the key (its own models, else its plan's, within its team's plan) may use `model`."""
        cached = self._plans.get(key.id)
        if cached is None or cached[0] is not key:
            cached = self._key_plan(key)
        return cached[2] is None or model in cached[2]

    def limits_of(self, key: KeyRecord) -> list[Limits]:
        """The key's effective limits (key scope first, then its team's), plans folded in."""
        cached = self._plans.get(key.id)
        if cached is None or cached[0] is not key:
            cached = self._key_plan(key)
        return [lim for _, lim in cached[1]]

    def used(self, label: str, name: str, period: str, now: float | None = None) -> tuple[int, float]:
        """Tokens and money a key or team scope has used this period."""
        now = time.time() if now is None else now
        c = self.counter(label, name)
        c.roll(*self._periods(now))
        return c.used(period), c.spent(period)

    def _key_plan(self, key: KeyRecord) -> tuple[KeyRecord, list[tuple[Counter, Limits]], frozenset[str] | None]:
        eff = effective(key, self._plan_records.get(key.plan) if key.plan else None, self._groups)
        plan = [(self.counter("key", key.id), Limits("key", eff.rpm, eff.tpm, eff.max_parallel, eff.budget_tokens,
                                                      eff.budget_period, True, eff.budget_usd))]
        models = eff.models
        team = self._teams.get(key.team) if key.team else None
        if team is not None:
            teff = effective(team, self._plan_records.get(team.plan) if team.plan else None, self._groups)
            plan.append((self.counter("team", team.name), Limits("team", teff.rpm, teff.tpm, teff.max_parallel,
                                                                 teff.budget_tokens, teff.budget_period, True,
                                                                 teff.budget_usd)))
            if teff.models is not None:
                models = teff.models if models is None else models & teff.models
        cached = (key, plan, models)
        self._plans[key.id] = cached
        return cached

    def _check(self, c: Counter, lim: Limits, now: float, plan: list[tuple[Counter, Limits]]) -> None:
        who = WHO[lim.label]
        if lim.rpm is not None and len(c.hits) >= lim.rpm:
            wait = c.hits[0] + WINDOW - now if c.hits else WINDOW
            raise RateLimited(f"{who} reached its limit of {lim.rpm} requests per minute", retry_after=wait,
                              reason=f"{lim.label}_rpm", headers=_header_dict(plan, now))
        if lim.tpm is not None and c.token_sum >= lim.tpm:
            raise RateLimited(f"{who} reached its limit of {lim.tpm} tokens per minute",
                              retry_after=c.tokens_free_in(lim.tpm, now) if lim.tpm else WINDOW,
                              reason=f"{lim.label}_tpm", headers=_header_dict(plan, now))
        if lim.max_parallel is not None and c.parallel >= lim.max_parallel:
            raise RateLimited(f"{who} already has {lim.max_parallel} requests in flight", retry_after=1,
                              reason=f"{lim.label}_parallel", headers={
                                  **_header_dict(plan, now), "x-ratelimit-limit-parallel": str(lim.max_parallel),
                                  "x-ratelimit-remaining-parallel": "0", "x-ratelimit-reset-parallel": "1s"})
        if lim.budget_tokens is not None and c.used(lim.budget_period) >= lim.budget_tokens:
            reset = _period_end(lim.budget_period, now)
            raise RateLimited(f"{who} has used its budget of {lim.budget_tokens} tokens for this "
                              f"{lim.budget_period} (UTC)", retry_after=reset - now, reason=f"{lim.label}_budget",
                              code="budget_exceeded", cap=None, cures_soon=False, headers={
                                  **_header_dict(plan, now), "x-ratelimit-limit-budget-tokens": str(lim.budget_tokens),
                                  "x-ratelimit-remaining-budget-tokens": "0",
                                  "x-ratelimit-reset-budget": f"{int(reset - now + 0.999)}s"})
        if lim.budget_usd is not None and c.spent(lim.budget_period) >= lim.budget_usd:
            reset = _period_end(lim.budget_period, now)
            raise RateLimited(f"{who} has spent its budget of ${lim.budget_usd:g} for this {lim.budget_period} "
                              f"(UTC)", retry_after=reset - now, reason=f"{lim.label}_budget_usd",
                              code="budget_exceeded", cap=None, cures_soon=False, headers={
                                  **_header_dict(plan, now), "x-ratelimit-limit-budget-usd": f"{lim.budget_usd:g}",
                                  "x-ratelimit-remaining-budget-usd": "0",
                                  "x-ratelimit-reset-budget": f"{int(reset - now + 0.999)}s"})

    def _finish(self, adm: Admission, tokens: int, cost: float, now: float) -> None:
        day, month = self._periods(now)
        if adm.batch:
            for c, lim in adm.scopes:
                c.roll(day, month)
                c.charge_budget(tokens, lim.budget, cost)
            return
        for c, lim in adm.scopes:
            c.parallel = max(0, c.parallel - 1)
            c.roll(day, month)
            c.charge(now, tokens, lim.budget, cost)

    # -- state -------------------------------------------------------------------
    def rebuild(self, window: Iterable[UsageLike], day_totals: dict[str, dict[str, int]],
                month_totals: dict[str, dict[str, int]], now: float | None = None,
                day_costs: dict[str, dict[str, float]] | None = None,
                month_costs: dict[str, dict[str, float]] | None = None) -> None:
        """Restore counters from the ledger: the last minute's rows, and token (and money) totals
        for the current UTC day and month by scope ("key" -> {key_id: n}, "team" -> {team: n})."""
        now = time.time() if now is None else now
        day, month = self._periods(now)
        for scope in ("key", "team"):
            for name, usd in (day_costs or {}).get(scope, {}).items():
                c = self.counter(scope, name)
                c.roll(day, month)
                c.day_usd = usd
            for name, usd in (month_costs or {}).get(scope, {}).items():
                c = self.counter(scope, name)
                c.roll(day, month)
                c.month_usd = usd
            for name, n in day_totals.get(scope, {}).items():
                c = self.counter(scope, name)
                c.roll(day, month)
                c.day_used = n
            for name, n in month_totals.get(scope, {}).items():
                c = self.counter(scope, name)
                c.roll(day, month)
                c.month_used = n
        for row in sorted(window, key=lambda r: r.ts):  # token buckets must be appended in order
            started = row.ts - (row.latency_ms or 0) / 1000
            tokens = row.prompt_tokens + row.completion_tokens
            scopes = []
            if row.key_id:
                scopes.append(self.counter("key", row.key_id))
                if row.end_user:
                    scopes.append(self._users.counter(row.key_id, row.end_user))
            if row.team:
                scopes.append(self.counter("team", row.team))
            for c in scopes:
                c.hits.append(started)
                if tokens > 0:
                    c.add_tokens(row.ts, tokens)
        for c in (*self._counters.values(), *self._users.counters()):
            # Sort: rows end in a different order than they started.
            if c.hits and any(a > b for a, b in zip(c.hits, list(c.hits)[1:])):
                c.hits = deque(sorted(c.hits))
            c.prune(now)

    def sweep(self, now: float | None = None) -> int:
        """Forget idle end-user counters (they carry no budget); returns how many."""
        now = time.time() if now is None else now
        for c in self._counters.values():
            c.prune(now)
        return self._users.sweep(now)

    def __len__(self) -> int:
        return len(self._counters) + len(self._users)


def _headers(plan: list[tuple[Counter, Limits]], now: float) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* for the tightest request and token limits among the scopes (every request: kept cheap)."""
    h: list[tuple[bytes, bytes]] = []
    best_req = best_tok = None
    for c, lim in plan:
        if lim.rpm is not None:
            left = lim.rpm - len(c.hits)
            if best_req is None or left < best_req[1]:
                best_req = (lim.rpm, left, c)
        if lim.tpm is not None:
            left = lim.tpm - c.token_sum
            if best_tok is None or left < best_tok[1]:
                best_tok = (lim.tpm, left, c)
    if best_req is not None:
        limit, left, c = best_req
        reset = c.hits[0] + WINDOW - now if c.hits else 0.0
        h += ((b"x-ratelimit-limit-requests", b"%d" % limit), (b"x-ratelimit-remaining-requests", b"%d" % max(0, left)),
              (b"x-ratelimit-reset-requests", b"%ds" % round(max(0.0, reset))))
    if best_tok is not None:
        limit, left, c = best_tok
        reset = c.tokens[0][0] + 1 + WINDOW - now if c.tokens else 0.0
        h += ((b"x-ratelimit-limit-tokens", b"%d" % limit), (b"x-ratelimit-remaining-tokens", b"%d" % max(0, left)),
              (b"x-ratelimit-reset-tokens", b"%ds" % round(max(0.0, reset))))
    return h


def _period_end(period: str, now: float) -> float:
    return next_month_start(now) if period == "month" else (day_id(now) + 1) * 86400.0


def _header_dict(plan: list[tuple[Counter, Limits]], now: float) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in _headers(plan, now)}
