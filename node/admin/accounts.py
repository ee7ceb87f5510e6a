"""Admin routes for keys, teams, admin tokens and plans (all writes audited)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request

from node.accounts.keys import KeyRecord, hash_secret, new_secret
from node.accounts.plans import PlanRecord
from node.accounts.roles import Principal
from node.accounts.teams import TeamRecord
from node.accounts.tokens import TokenRecord
from node.admin.access import audited, need, own_team
from node.admin.protocol import KeyCreate, KeyRotate, KeyUpdate, PlanCreate, PlanUpdate, TeamCreate, TeamUpdate, TokenCreate
from node.errors import InvalidRequest, NotFound

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node


class Conflict(InvalidRequest):
    status = 409
    code = "conflict"


def add_account_routes(r: FastAPI, node: Node) -> None:
    """Add these routes to the admin app."""

    def key_or_404(key_id: str, who: Principal) -> KeyRecord:
        record = node.keys.get(key_id)
        if record is None or not who.sees_team(record.team):
            # A team token learns nothing of other teams' keys, not even that they exist.
            raise NotFound(f"no key with id '{key_id}'", code="key_not_found")
        return record

    def check_plan(name: str | None) -> None:
        if name is not None and name not in node.plans():
            raise InvalidRequest(f"no plan named '{name}'; create it first (/admin/v1/plans or [plans.{name}])",
                                 param="plan", code="plan_not_found")

    # -- keys ----------------------------------------------------------------------
    @r.post("/admin/v1/keys", status_code=201)
    async def create_key(body: KeyCreate, request: Request, who: Principal = need(node, "keys.manage")) -> dict[str, Any]:
        fields = body.model_dump(exclude_none=True)
        if who.team is not None:
            own_team(who, fields.get("team", who.team), f"team '{fields.get('team')}'")
            fields["team"] = who.team
        check_plan(fields.get("plan"))
        if "models" in fields:
            fields["models"] = tuple(fields["models"])
        record, secret = await node.create_key(**fields)
        await audited(node, request, "keys.create", record.id, record.public())
        return {**record.public(), "key": secret}

    @r.get("/admin/v1/keys")
    async def list_keys(who: Principal = need(node, "keys.read"), q: str | None = Query(None, max_length=200),
                        limit: int | None = Query(None, ge=1, le=100_000), offset: int = Query(0, ge=0, le=10_000_000),
                        newest_first: bool = False) -> dict[str, Any]:
        """Keys oldest first (or newest first); `q` matches name, id, team or prefix; `total` counts every match."""
        rows = sorted((k for k in node.keys.all() if who.sees_team(k.team)), key=lambda k: k.created_at,
                      reverse=newest_first)
        if q:
            needle = q.lower()
            rows = [k for k in rows
                    if needle in k.name.lower() or needle in k.id or needle in (k.team or "").lower() or needle in k.prefix]
        page = rows[offset:offset + limit] if limit is not None else rows[offset:]
        return {"object": "list", "total": len(rows), "data": [k.public() for k in page]}

    @r.get("/admin/v1/keys/{key_id}")
    async def get_key(key_id: str, who: Principal = need(node, "keys.read")) -> dict[str, Any]:
        return key_or_404(key_id, who).public()

    @r.patch("/admin/v1/keys/{key_id}")
    async def update_key(key_id: str, body: KeyUpdate, request: Request,
                         who: Principal = need(node, "keys.manage")) -> dict[str, Any]:
        record = key_or_404(key_id, who)
        changes = body.model_dump(exclude_unset=True)
        if changes.get("revoked") is False and record.revoked:
            raise Conflict("a revoked key cannot be restored; create a new key (or rotate a live one)",
                           param="revoked", code="key_revoked")
        if "team" in changes:
            own_team(who, changes["team"], f"team '{changes['team']}'")
        check_plan(changes.get("plan"))
        if "models" in changes and changes["models"] is not None:
            changes["models"] = tuple(changes["models"])
        for name in ("metadata", "budget_period", "name", "revoked"):  # null for a field that cannot be: unchanged
            if name in changes and changes[name] is None:
                changes.pop(name)
        record = record.updated(**changes)
        await node.save_key(record)
        await audited(node, request, "keys.update", record.id, changes)
        return record.public()

    @r.post("/admin/v1/keys/{key_id}/revoke")
    @r.delete("/admin/v1/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request, who: Principal = need(node, "keys.manage")) -> dict[str, Any]:
        record = key_or_404(key_id, who).updated(revoked=True)
        await node.save_key(record)
        await audited(node, request, "keys.revoke", record.id, {"revoked": True})
        return record.public()

    @r.post("/admin/v1/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, request: Request, body: KeyRotate | None = None,
                         who: Principal = need(node, "keys.manage")) -> dict[str, Any]:
        """A new secret; the old one stays valid for grace_s seconds (0: from now on it is refused)."""
        grace = body.grace_s if body is not None else 0
        record = key_or_404(key_id, who)
        if record.revoked:
            raise Conflict("a revoked key cannot be rotated; create a new key", code="key_revoked")
        secret = new_secret()
        record = record.updated(secret_hash=hash_secret(secret), prefix=secret[:8], old_secret_hash=record.secret_hash,
                                old_valid_until=time.time() + grace)
        await node.save_key(record)
        await audited(node, request, "keys.rotate", record.id, {"grace_s": grace})
        return {**record.public(), "key": secret}

    # -- teams ---------------------------------------------------------------------
    def team_or_404(name: str, who: Principal) -> TeamRecord:
        team = node.quotas.team(name)
        if team is None or not who.sees_team(name):
            raise NotFound(f"no team named '{name}'", code="team_not_found")
        return team

    @r.post("/admin/v1/teams", status_code=201)
    async def create_team(body: TeamCreate, request: Request, _: Principal = need(node, "teams.manage")) -> dict[str, Any]:
        assert node.storage is not None
        check_plan(body.plan)
        team = TeamRecord(**body.model_dump(exclude_none=True))
        await asyncio.to_thread(node.storage.insert_team, team)
        await node.refresh_keys(force=True)
        await audited(node, request, "teams.create", team.name, team.public())
        return team.public()

    @r.get("/admin/v1/teams")
    async def list_teams(who: Principal = need(node, "teams.read")) -> dict[str, Any]:
        assert node.storage is not None
        teams = await asyncio.to_thread(node.storage.list_teams)
        return {"object": "list", "data": [t.public() for t in teams if who.sees_team(t.name)]}

    @r.get("/admin/v1/teams/{name}")
    async def get_team(name: str, who: Principal = need(node, "teams.read")) -> dict[str, Any]:
        team = team_or_404(name, who)
        keys = sorted(k.id for k in node.keys.all() if k.team == name)
        return {**team.public(), "keys": keys}

    @r.patch("/admin/v1/teams/{name}")
    async def update_team(name: str, body: TeamUpdate, request: Request,
                          who: Principal = need(node, "teams.manage")) -> dict[str, Any]:
        assert node.storage is not None
        changes = body.model_dump(exclude_unset=True)
        for field in ("metadata", "budget_period"):
            if field in changes and changes[field] is None:
                changes.pop(field)
        check_plan(changes.get("plan"))
        team = team_or_404(name, who).updated(**changes)
        await asyncio.to_thread(node.storage.save_team, team)
        await node.refresh_keys(force=True)
        await audited(node, request, "teams.update", name, changes)
        return team.public()

    @r.delete("/admin/v1/teams/{name}")
    async def delete_team(name: str, request: Request, who: Principal = need(node, "teams.manage")) -> dict[str, Any]:
        """Remove a team's limits; its keys keep the team name (for usage) and their own limits."""
        assert node.storage is not None
        team_or_404(name, who)
        await asyncio.to_thread(node.storage.delete_team, name)
        await node.refresh_keys(force=True)
        await audited(node, request, "teams.delete", name, {})
        return {"name": name, "deleted": True}

    # -- admin tokens --------------------------------------------------------------
    def token_or_404(token_id: str) -> TokenRecord:
        record = node.tokens.get(token_id)
        if record is None:
            raise NotFound(f"no admin token with id '{token_id}'", code="token_not_found")
        return record

    @r.post("/admin/v1/tokens", status_code=201)
    async def create_token(body: TokenCreate, request: Request,
                           who: Principal = need(node, "tokens.manage")) -> dict[str, Any]:
        record, secret = await node.create_token(body.name, body.role, body.team, who.id)
        await audited(node, request, "tokens.create", record.id, record.public())
        return {**record.public(), "token": secret}

    @r.get("/admin/v1/tokens")
    async def list_tokens(_: Principal = need(node, "tokens.manage")) -> dict[str, Any]:
        return {"object": "list", "data": [t.public() for t in node.tokens.all()]}

    @r.get("/admin/v1/tokens/{token_id}")
    async def get_token(token_id: str, _: Principal = need(node, "tokens.manage")) -> dict[str, Any]:
        return token_or_404(token_id).public()

    @r.post("/admin/v1/tokens/{token_id}/revoke")
    @r.delete("/admin/v1/tokens/{token_id}")
    async def revoke_token(token_id: str, request: Request, _: Principal = need(node, "tokens.manage")) -> dict[str, Any]:
        record = token_or_404(token_id).updated(revoked=True)
        await node.save_token(record)
        await audited(node, request, "tokens.revoke", record.id, {"revoked": True})
        return record.public()

    # -- plans ---------------------------------------------------------------------
    def plan_or_404(name: str) -> PlanRecord:
        plan = node.plans().get(name)
        if plan is None:
            raise NotFound(f"no plan named '{name}'", code="plan_not_found")
        return plan

    def check_models(models: list[str] | None) -> None:
        for m in models or ():
            if m.startswith("group:") and m[6:] not in node.config.model_groups:
                raise InvalidRequest(f"models: no model group '{m[6:]}' in [model_groups]", param="models")

    @r.post("/admin/v1/plans", status_code=201)
    async def create_plan(body: PlanCreate, request: Request, _: Principal = need(node, "plans.manage")) -> dict[str, Any]:
        assert node.storage is not None
        check_models(body.models)
        fields = body.model_dump(exclude_none=True)
        if "models" in fields:
            fields["models"] = tuple(fields["models"])
        plan = PlanRecord(**fields)
        await asyncio.to_thread(node.storage.insert_plan, plan)
        await node.refresh_keys(force=True)
        await audited(node, request, "plans.create", plan.name, plan.public())
        return plan.public()

    @r.get("/admin/v1/plans")
    async def list_plans(_: Principal = need(node, "plans.read")) -> dict[str, Any]:
        return {"object": "list", "data": [p.public() for _, p in sorted(node.plans().items())]}

    @r.get("/admin/v1/plans/{name}")
    async def get_plan(name: str, _: Principal = need(node, "plans.read")) -> dict[str, Any]:
        return plan_or_404(name).public()

    @r.patch("/admin/v1/plans/{name}")
    async def update_plan(name: str, body: PlanUpdate, request: Request,
                          _: Principal = need(node, "plans.manage")) -> dict[str, Any]:
        """Change a plan; every key and team on it follows within a second."""
        assert node.storage is not None
        check_models(body.models)
        changes = body.model_dump(exclude_unset=True)
        for field in ("metadata", "budget_period"):
            if field in changes and changes[field] is None:
                changes.pop(field)
        if changes.get("models") is not None:
            changes["models"] = tuple(changes["models"])
        plan = plan_or_404(name).updated(**changes)
        stored = any(p.name == name for p in await asyncio.to_thread(node.storage.list_plans))
        # A plan from appliance.toml is copied into the database on its first change (the copy wins).
        await asyncio.to_thread(node.storage.save_plan if stored else node.storage.insert_plan, plan)
        await node.refresh_keys(force=True)
        await audited(node, request, "plans.update", name, changes)
        return plan.public()

    @r.delete("/admin/v1/plans/{name}")
    async def delete_plan(name: str, request: Request, _: Principal = need(node, "plans.manage")) -> dict[str, Any]:
        assert node.storage is not None
        plan_or_404(name)
        users = [k.id for k in node.keys.all() if k.plan == name and not k.revoked]
        if users:
            raise Conflict(f"plan '{name}' is used by {len(users)} key(s) (e.g. {users[0]}); move them first")
        if not await asyncio.to_thread(node.storage.delete_plan, name):
            raise Conflict(f"plan '{name}' comes from appliance.toml; remove it there and reload")
        await node.refresh_keys(force=True)
        await audited(node, request, "plans.delete", name, {})
        return {"name": name, "deleted": True}

