"""Who may call an admin route: authentication, the role check, and the audit record of a write.

Every route declares the action it performs with `need(accounts, ACTION)`; the action's
lowest role lives in node/accounts/roles.py (one table). A test walks every route and
checks that it has one.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Depends, Request

from node.accounts.roles import ACTIONS, Principal, may
from node.accounts.service import Accounts
from node.errors import AuthenticationError, PermissionDenied, RateLimited


def bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def authenticate(accounts: Accounts, request: Request) -> Principal:
    """The caller, or 401 (no token, unknown, revoked); 429 first for an address past its failed tries."""
    source = request.client.host if request.client else ""
    wait = accounts.pacer.retry_after(source)
    if wait:
        raise RateLimited("too many failed authentications from this address; retry later", retry_after=wait,
                          reason="auth_failures", code="too_many_auth_failures")
    principal = accounts.principal(bearer(request))
    if principal is None:
        accounts.pacer.failed(source)
        raise AuthenticationError("admin token required: send Authorization: Bearer <admin key or token>")
    return principal


def need(accounts: Accounts, action: str) -> Any:
    """A FastAPI dependency: authenticate, then 403 permission_denied unless the role may do `action`."""
    if action not in ACTIONS:
        raise ValueError(f"unknown admin action {action!r}")

    async def check(request: Request) -> Principal:
        principal = authenticate(accounts, request)
        if not may(principal, action):
            scope = f" bound to team '{principal.team}'" if principal.team else ""
            raise PermissionDenied(f"a {principal.role.label} token{scope} may not do {action}",
                                   code="permission_denied")
        request.state.principal = principal
        return principal

    check.action = action  # type: ignore[attr-defined]  # read by the route-coverage test
    return Depends(check)


def own_team(who: Principal, team: str | None, what: str) -> None:
    """403 unless `who` may touch something of `team` (a team token: only its own team)."""
    if not who.sees_team(team):
        raise PermissionDenied(f"a token bound to team '{who.team}' may not touch {what}", code="permission_denied")


async def audited(accounts: Accounts, request: Request, action: str, target: str, changes: dict[str, Any]) -> None:
    """Append the audit record of a write (or a secret's reveal) that has just succeeded."""
    who: Principal = request.state.principal
    source = request.client.host if request.client else ""
    rid = request.scope.get("state", {}).get("request_id") or request.headers.get("x-request-id") or uuid.uuid4().hex
    await accounts.audit(who, source, action, target, changes, rid)
