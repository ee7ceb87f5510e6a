"""Admin routes for admin tokens (admins only; secrets shown once, never listed)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request

from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.accounts.tokens import TokenRecord
from node.admin.access import audited, need
from node.admin.paging import Paging, listing, paging
from node.admin.protocol import TokenCreate
from node.errors import NotFound


def token_or_404(accounts: Accounts, token_id: str) -> TokenRecord:
    record = accounts.token(token_id)
    if record is None:
        raise NotFound(f"no admin token with id '{token_id}'", code="token_not_found")
    return record


def add_token_routes(r: FastAPI, accounts: Accounts) -> None:
    """Create, list, read and revoke admin tokens."""

    @r.post("/admin/v1/tokens", status_code=201)
    async def create_token(body: TokenCreate, request: Request,
                           who: Principal = need(accounts, "tokens.manage")) -> dict[str, Any]:
        record, secret = await accounts.create_token(body.name, body.role, body.team, who.id)
        await audited(accounts, request, "tokens.create", record.id, record.public())
        return {**record.public(), "token": secret}

    @r.get("/admin/v1/tokens")
    async def list_tokens(_: Principal = need(accounts, "tokens.manage"), at: Paging = Depends(paging)) -> dict[str, Any]:
        """A page of admin tokens, oldest first."""
        page = accounts.list_tokens(at.offset, at.limit)
        return listing(page.data, TokenRecord.public, at, has_more=page.has_more, total=page.total)

    @r.get("/admin/v1/tokens/{token_id}")
    async def get_token(token_id: str, _: Principal = need(accounts, "tokens.manage")) -> dict[str, Any]:
        return token_or_404(accounts, token_id).public()

    @r.post("/admin/v1/tokens/{token_id}/revoke")
    @r.delete("/admin/v1/tokens/{token_id}")
    async def revoke_token(token_id: str, request: Request, _: Principal = need(accounts, "tokens.manage")) -> dict[str, Any]:
        record = token_or_404(accounts, token_id).updated(revoked=True)
        await accounts.save_token(record)
        await audited(accounts, request, "tokens.revoke", record.id, {"revoked": True})
        return record.public()
