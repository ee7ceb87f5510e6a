"""Batches in the admin API: every key's (admin, operator, viewer tokens) or one team's (team tokens)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, Request

from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.admin.access import audited, need
from node.admin.facade import Operations
from node.batches.records import BatchRecord
from node.batches.service import Batches, Owner
from node.errors import NoReadyReplica

ID = r"^[A-Za-z0-9_-]{1,64}$"


def _wire(b: BatchRecord) -> dict[str, Any]:
    return {**b.wire(), "key_id": b.key_id, "team": b.team}


def add_batch_routes(app: FastAPI, accounts: Accounts, ops: Operations) -> None:
    """List, show and cancel batches."""

    def service() -> Batches:
        jobs = ops.batch_jobs()
        if jobs is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        return jobs

    @app.get("/admin/v1/batches")
    async def list_batches(limit: int = Query(20, ge=1, le=1000), after: str | None = Query(None, pattern=ID),
                           who: Principal = need(accounts, "batches.read")) -> dict[str, Any]:
        items = await service().list(Owner(None, who.team), after, limit + 1)
        data = [_wire(b) for b in items[:limit]]
        return {"object": "list", "data": data, "has_more": len(items) > limit,
                "last_id": data[-1]["id"] if data else None}

    @app.get("/admin/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, who: Principal = need(accounts, "batches.read")) -> dict[str, Any]:
        return _wire(await service().batch(Owner(None, who.team), batch_id))

    @app.post("/admin/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request,
                           who: Principal = need(accounts, "batches.manage")) -> dict[str, Any]:
        b = await service().cancel(Owner(None, who.team), batch_id)
        await audited(accounts, request, "batch.cancel", b.id, {"status": b.status.value})
        return _wire(b)
