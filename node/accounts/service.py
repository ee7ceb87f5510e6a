"""The accounts service: keys, admin tokens, teams, plans and the audit log, in memory and in storage.

The gateway reads the rings (`keys`, `tokens`) and the quotas this service keeps
current; the admin API reads and writes through its methods, never through storage.
Every write goes to the database first, then to the rings, under one lock shared
with the refresh that reloads them (a key written meanwhile must not be lost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from node.accounts.audit import AuditRecord, scrub
from node.accounts.keys import KeyRecord, KeyRing, hash_secret, new_key_id, new_secret
from node.accounts.pacing import FailurePacer
from node.accounts.plans import PlanRecord, effective
from node.accounts.quotas import Quotas
from node.accounts.roles import Principal
from node.accounts.storage import Storage, StorageConflict, StorageUnavailable
from node.accounts.teams import TeamRecord
from node.accounts.tokens import TokenRecord, TokenRing, new_token_id, new_token_secret
from node.config import Config
from node.errors import InvalidRequest

T = TypeVar("T")

# The storage errors callers of this service may see (the admin API maps them to 409 and 503).
__all__ = ["Accounts", "Page", "StorageConflict", "StorageUnavailable", "page_of"]


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: its rows, how many match in all, and whether more follow."""

    data: list[T]
    total: int
    offset: int
    limit: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.data) < self.total


def page_of(rows: list[T], offset: int, limit: int) -> Page[T]:
    return Page(rows[offset:offset + limit], len(rows), offset, limit)


class Accounts:
    """Keys, tokens, teams, plans and audit: one service for the gateway's refresh and the admin API."""

    def __init__(self, config: Config, quotas: Quotas) -> None:
        self.config = config
        self.quotas = quotas
        self.keys = KeyRing()
        self.tokens = TokenRing()
        # failed authentications per client address, across every API (admin, /v1 and friends, console)
        n = config.node.auth_failures_per_minute
        self.pacer = FailurePacer(per_minute=n, burst=n)
        self._storage: Storage | None = None
        self._stored_plans: dict[str, PlanRecord] = {}
        self._version: int | None = None
        # A refresh reads the database then swaps the rings; a record written in between must not be lost.
        self._lock = asyncio.Lock()

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            raise RuntimeError("the accounts service is used before the node opened its database")
        return self._storage

    async def open(self, storage: Storage, bootstrap_secret: str) -> None:
        """Attach the (migrated) database and load every record from it."""
        self._storage = storage
        self.tokens.set_bootstrap(bootstrap_secret)
        await self.refresh(force=True)

    def configure(self, config: Config) -> None:
        """Take a reloaded appliance.toml: its plans and model groups apply at once."""
        self.config = config
        self.quotas.set_teams(self.quotas.teams(), self.plans(), config.model_groups)

    async def refresh(self, force: bool = False) -> None:
        """Reload keys, teams, tokens and plans when the database says they changed (other nodes' changes too)."""
        storage = self.storage
        async with self._lock:
            version = await asyncio.to_thread(storage.keys_version)
            if not force and version == self._version:
                return
            records = await asyncio.to_thread(storage.list_keys)
            teams = await asyncio.to_thread(storage.list_teams)
            tokens = await asyncio.to_thread(storage.list_tokens)
            plans = await asyncio.to_thread(storage.list_plans)
            self.keys.replace_all(records)
            self._stored_plans = {p.name: p for p in plans}
            self.quotas.set_teams(teams, self.plans(), self.config.model_groups)
            self.tokens.replace_all(tokens)
            self._version = version

    # -- keys --------------------------------------------------------------------
    def key(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    def list_keys(self, who: Principal, q: str | None, offset: int, limit: int, newest_first: bool) -> Page[KeyRecord]:
        """The keys `who` may see, oldest (or newest) first; `q` matches name, id, team or prefix."""
        rows = [k for k in self.keys.all() if who.sees_team(k.team)]
        if q:
            needle = q.lower()
            rows = [k for k in rows
                    if needle in k.name.lower() or needle in k.id or needle in (k.team or "").lower() or needle in k.prefix]
        rows.sort(key=lambda k: k.created_at, reverse=newest_first)
        return page_of(rows, offset, limit)

    async def create_key(self, **fields: Any) -> tuple[KeyRecord, str]:
        """A new key and its secret (returned once, stored as a hash)."""
        if fields.get("plan") is None:  # [quotas.default] is for keys without a plan
            q = self.config.default_quota
            defaults = {"rpm": q.rpm, "tpm": q.tpm, "max_parallel": q.max_parallel, "budget_tokens": q.budget_tokens,
                        "budget_period": q.budget_period, "user_rpm": q.user_rpm, "user_tpm": q.user_tpm}
            for k, v in defaults.items():
                if fields.get(k) is None:
                    fields[k] = v
        secret = new_secret()
        record = KeyRecord(id=new_key_id(), secret_hash=hash_secret(secret), prefix=secret[:8], **fields)
        async with self._lock:
            await asyncio.to_thread(self.storage.insert_key, record)
            self.keys.put(record)
        return record, secret

    async def save_key(self, record: KeyRecord) -> None:
        async with self._lock:
            await asyncio.to_thread(self.storage.save_key, record)
            self.keys.put(record)

    # -- admin tokens ------------------------------------------------------------
    def principal(self, secret: str) -> Principal | None:
        """Who an admin secret stands for (an admin token or the bootstrap key); None if unknown or revoked."""
        return self.tokens.principal(secret)

    def token(self, token_id: str) -> TokenRecord | None:
        return self.tokens.get(token_id)

    def list_tokens(self, offset: int, limit: int) -> Page[TokenRecord]:
        return page_of(self.tokens.all(), offset, limit)

    async def create_token(self, name: str, role: str, team: str | None, created_by: str) -> tuple[TokenRecord, str]:
        """A new admin token and its secret (returned once, stored as a hash)."""
        secret = new_token_secret()
        record = TokenRecord(id=new_token_id(), name=name, role=role, team=team, secret_hash=hash_secret(secret),
                             prefix=secret[:11], created_by=created_by)
        async with self._lock:
            await asyncio.to_thread(self.storage.insert_token, record)
            self.tokens.put(record)
        return record, secret

    async def save_token(self, record: TokenRecord) -> None:
        async with self._lock:
            await asyncio.to_thread(self.storage.save_token, record)
            self.tokens.put(record)

    # -- teams -------------------------------------------------------------------
    def team(self, name: str) -> TeamRecord | None:
        return self.quotas.team(name)

    def list_teams(self, who: Principal, offset: int, limit: int) -> Page[TeamRecord]:
        rows = sorted((t for t in self.quotas.teams() if who.sees_team(t.name)), key=lambda t: t.name)
        return page_of(rows, offset, limit)

    def team_keys(self, name: str) -> list[str]:
        """The ids of a team's keys, sorted."""
        return sorted(k.id for k in self.keys.all() if k.team == name)

    async def create_team(self, team: TeamRecord) -> None:
        await self._write(self.storage.insert_team, team)

    async def save_team(self, team: TeamRecord) -> None:
        await self._write(self.storage.save_team, team)

    async def delete_team(self, name: str) -> None:
        await self._write(self.storage.delete_team, name)

    # -- plans -------------------------------------------------------------------
    def plans(self) -> dict[str, PlanRecord]:
        """Every plan: appliance.toml's [plans.*], overridden by the stored ones of the same name."""
        plans = {name: PlanRecord(name=name, models=tuple(p.models) if p.models is not None else None, rpm=p.rpm,
                                  tpm=p.tpm, max_parallel=p.max_parallel, budget_tokens=p.budget_tokens,
                                  budget_usd=p.budget_usd, budget_period=p.budget_period, created_at=0, updated_at=0)
                 for name, p in self.config.plans.items()}
        return {**plans, **self._stored_plans}

    def list_plans(self, offset: int, limit: int) -> Page[PlanRecord]:
        return page_of([p for _, p in sorted(self.plans().items())], offset, limit)

    def check_plan(self, name: str | None) -> None:
        """400 plan_not_found unless `name` is None or a plan that exists."""
        if name is not None and name not in self.plans():
            raise InvalidRequest(f"no plan named '{name}'; create it first (/admin/v1/plans or [plans.{name}])",
                                 param="plan", code="plan_not_found")

    def check_models(self, models: list[str] | None) -> None:
        """400 unless every `group:NAME` in a plan's models names a [model_groups] entry."""
        for m in models or ():
            if m.startswith("group:") and m[6:] not in self.config.model_groups:
                raise InvalidRequest(f"models: no model group '{m[6:]}' in [model_groups]", param="models")

    def plan_users(self, name: str) -> list[str]:
        """The ids of the live keys on a plan."""
        return [k.id for k in self.keys.all() if k.plan == name and not k.revoked]

    async def save_plan(self, plan: PlanRecord, *, new: bool) -> None:
        """Store a plan; a plan from appliance.toml is copied into the database on its first change (the copy wins)."""
        storage = self.storage
        stored = not new and any(p.name == plan.name for p in await asyncio.to_thread(storage.list_plans))
        await self._write(storage.save_plan if stored else storage.insert_plan, plan)

    async def delete_plan(self, name: str) -> bool:
        """Delete a stored plan; False when it comes from appliance.toml."""
        deleted = await asyncio.to_thread(self.storage.delete_plan, name)
        if deleted:
            await self.refresh(force=True)
        return deleted

    def budgets_of(self, scope: str, record: Any) -> tuple[int | None, float | None, str]:
        """A key's or team's budgets with its plan folded in (for budget alerts)."""
        e = effective(record, self.plans().get(record.plan) if record.plan else None, {})
        return e.budget_tokens, e.budget_usd, e.budget_period

    # -- audit -------------------------------------------------------------------
    async def audit(self, who: Principal, source: str, action: str, target: str, changes: dict[str, Any],
                    request_id: str) -> AuditRecord:
        """Append one record to the hash-chained audit log (secrets scrubbed from `changes`)."""
        return await self.audit_as(who.id, who.role.label, source, action, target, changes, request_id)

    async def audit_as(self, actor_id: str, actor_role: str, source: str, action: str, target: str,
                       changes: dict[str, Any], request_id: str) -> AuditRecord:
        """`audit` for an actor that is no admin token (the node itself, at start)."""
        record = AuditRecord(seq=0, ts=time.time(), actor_id=actor_id, actor_role=actor_role, source=source,
                             action=action, target=target, changes=scrub(changes), request_id=request_id)
        return await asyncio.to_thread(self.storage.append_audit, record)

    async def _write(self, write: Callable[[Any], Any], record: Any) -> None:
        """A team or plan write, then a reload: quotas derive from every team and plan together."""
        await asyncio.to_thread(write, record)
        await self.refresh(force=True)
