"""Batches in the admin API: every key's (admin, operator, viewer tokens) or one team's (team tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request

from node.accounts.roles import Principal
from node.admin.access import audited, need
from node.batches.service import Batches, Owner
from node.errors import NoReadyReplica

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node

ID = r"^[A-Za-z0-9_-]{1,64}$"


def add_batch_routes(app: FastAPI, node: Node) -> None:
    def service() -> Batches:
        if node.batches is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        return node.batches

    def owner(who: Principal) -> Owner:
        return Owner(None, who.team)

    @app.get("/admin/v1/batches")
    async def list_batches(limit: int = Query(20, ge=1, le=1000), after: str | None = Query(None, pattern=ID),
                           who: Principal = need(node, "batches.read")) -> dict[str, Any]:
        items = await service().list(owner(who), after, limit + 1)
        data = [{**b.wire(), "key_id": b.key_id, "team": b.team} for b in items[:limit]]
        return {"object": "list", "data": data, "has_more": len(items) > limit,
                "last_id": data[-1]["id"] if data else None}

    @app.get("/admin/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, who: Principal = need(node, "batches.read")) -> dict[str, Any]:
        b = await service().batch(owner(who), batch_id)
        return {**b.wire(), "key_id": b.key_id, "team": b.team}

    @app.post("/admin/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request,
                           who: Principal = need(node, "batches.manage")) -> dict[str, Any]:
        b = await service().cancel(owner(who), batch_id)
        await audited(node, request, "batch.cancel", b.id, {"status": b.status.value})
        return {**b.wire(), "key_id": b.key_id, "team": b.team}
