"""Admin routes for API keys (every write audited; secrets shown once, never listed)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Depends, FastAPI, Query, Request

from node.accounts.keys import KeyRecord, hash_secret, new_secret
from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.admin.access import audited, need, own_team
from node.admin.paging import Paging, listing, paging
from node.admin.protocol import KeyCreate, KeyRotate, KeyUpdate
from node.errors import InvalidRequest, NotFound


class Conflict(InvalidRequest):
    status = 409
    code = "conflict"


def key_or_404(accounts: Accounts, key_id: str, who: Principal) -> KeyRecord:
    record = accounts.key(key_id)
    if record is None or not who.sees_team(record.team):
        # A team token learns nothing of other teams' keys, not even that they exist.
        raise NotFound(f"no key with id '{key_id}'", code="key_not_found")
    return record


def add_key_routes(r: FastAPI, accounts: Accounts) -> None:
    """Create, list, read, change, revoke and rotate keys."""

    @r.post("/admin/v1/keys", status_code=201)
    async def create_key(body: KeyCreate, request: Request, who: Principal = need(accounts, "keys.manage")) -> dict[str, Any]:
        fields = body.model_dump(exclude_none=True)
        if who.team is not None:
            own_team(who, fields.get("team", who.team), f"team '{fields.get('team')}'")
            fields["team"] = who.team
        accounts.check_plan(fields.get("plan"))
        if "models" in fields:
            fields["models"] = tuple(fields["models"])
        record, secret = await accounts.create_key(**fields)
        await audited(accounts, request, "keys.create", record.id, record.public())
        return {**record.public(), "key": secret}

    @r.get("/admin/v1/keys")
    async def list_keys(who: Principal = need(accounts, "keys.read"), q: str | None = Query(None, max_length=200),
                        at: Paging = Depends(paging), newest_first: bool = False) -> dict[str, Any]:
        """A page of keys oldest first (or newest first); `q` matches name, id, team or prefix; `total` counts every match."""
        def build() -> dict[str, Any]:  # filtering and sorting every key: in a thread (the ring is swapped, never changed)
            page = accounts.list_keys(who, q, at.offset, at.limit, newest_first)
            return listing(page.data, KeyRecord.public, at, has_more=page.has_more, total=page.total)
        return await asyncio.to_thread(build)

    @r.get("/admin/v1/keys/{key_id}")
    async def get_key(key_id: str, who: Principal = need(accounts, "keys.read")) -> dict[str, Any]:
        return key_or_404(accounts, key_id, who).public()

    @r.patch("/admin/v1/keys/{key_id}")
    async def update_key(key_id: str, body: KeyUpdate, request: Request,
                         who: Principal = need(accounts, "keys.manage")) -> dict[str, Any]:
        record = key_or_404(accounts, key_id, who)
        changes = body.model_dump(exclude_unset=True)
        if changes.get("revoked") is False and record.revoked:
            raise Conflict("a revoked key cannot be restored; create a new key (or rotate a live one)",
                           param="revoked", code="key_revoked")
        if "team" in changes:
            own_team(who, changes["team"], f"team '{changes['team']}'")
        accounts.check_plan(changes.get("plan"))
        if "models" in changes and changes["models"] is not None:
            changes["models"] = tuple(changes["models"])
        for name in ("metadata", "budget_period", "name", "revoked"):  # null for a field that cannot be: unchanged
            if name in changes and changes[name] is None:
                changes.pop(name)
        record = record.updated(**changes)
        await accounts.save_key(record)
        await audited(accounts, request, "keys.update", record.id, changes)
        return record.public()

    add_key_secret_routes(r, accounts)


def add_key_secret_routes(r: FastAPI, accounts: Accounts) -> None:
    """Revoke and rotate: the writes that end a secret or make a new one."""

    @r.post("/admin/v1/keys/{key_id}/revoke")
    @r.delete("/admin/v1/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request, who: Principal = need(accounts, "keys.manage")) -> dict[str, Any]:
        record = key_or_404(accounts, key_id, who).updated(revoked=True)
        await accounts.save_key(record)
        await audited(accounts, request, "keys.revoke", record.id, {"revoked": True})
        return record.public()

    @r.post("/admin/v1/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, request: Request, body: KeyRotate | None = None,
                         who: Principal = need(accounts, "keys.manage")) -> dict[str, Any]:
        """A new secret; the old one stays valid for grace_s seconds (0: from now on it is refused)."""
        grace = body.grace_s if body is not None else 0
        record = key_or_404(accounts, key_id, who)
        if record.revoked:
            raise Conflict("a revoked key cannot be rotated; create a new key", code="key_revoked")
        secret = new_secret()
        record = record.updated(secret_hash=hash_secret(secret), prefix=secret[:8], old_secret_hash=record.secret_hash,
                                old_valid_until=time.time() + grace)
        await accounts.save_key(record)
        await audited(accounts, request, "keys.rotate", record.id, {"grace_s": grace})
        return {**record.public(), "key": secret}
