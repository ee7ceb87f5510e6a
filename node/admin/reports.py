"""Admin routes that read records: usage totals, the ledger's rows, the audit log (and its verification)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator

from node.accounts.audit import AuditRecord
from node.accounts.reports import Reports
from node.accounts.roles import Principal
from node.accounts.service import Accounts
from node.admin.access import need, own_team
from node.admin.paging import MAX_OFFSET, Paging, listing
from node.admin.protocol import MAX_TIME, check_text

USAGE_DEFAULT_LIMIT = 1000   # groups per usage page when the caller names no limit
USAGE_MAX_LIMIT = 10_000
AUDIT_DEFAULT_LIMIT = 1000
AUDIT_MAX_LIMIT = 10_000


def _opt_text(v: str | None) -> str | None:
    return None if v is None else check_text(v)


# Query parameters bounded to what the databases hold (422, never 500).
Time = Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False)]
Text = Annotated[str | None, Query(max_length=200), AfterValidator(_opt_text)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]


def team_of(who: Principal, team: str | None) -> str | None:
    """The team filter a caller gets: a team token sees only its own team's usage, whatever it asks for."""
    if who.team is None:
        return team
    own_team(who, team if team is not None else who.team, f"team '{team}'")
    return who.team


def add_usage_routes(r: FastAPI, accounts: Accounts, reports: Reports) -> None:
    """Usage totals and the ledger's rows."""

    @r.get("/admin/v1/usage")
    async def usage(group_by: Annotated[str, Query(max_length=200)] = "key,model",
                    since: Time = None, until: Time = None, key: Text = None, team: Text = None, model: Text = None,
                    offset: Offset = 0, limit: Annotated[int, Query(ge=1, le=USAGE_MAX_LIMIT)] = USAGE_DEFAULT_LIMIT,
                    who: Principal = need(accounts, "usage.read")) -> dict[str, Any]:
        """A page of totals grouped by any of key, team, model, user, api, day, month (UTC) over [since, until)."""
        groups = [g for g in group_by.split(",") if g]
        rows, more = await reports.usage(groups, since, until, key, team_of(who, team), model, offset, limit)
        return listing(rows, dict, Paging(offset, limit), has_more=more, group_by=groups, since=since, until=until)

    @r.get("/admin/v1/usage/requests")
    async def usage_requests(since: Time = None, until: Time = None, key: Text = None, team: Text = None,
                             model: Text = None, format: Literal["jsonl", "csv"] = "jsonl",
                             who: Principal = need(accounts, "usage.read")) -> StreamingResponse:
        """Every ledger row in [since, until), oldest first, streamed a page at a time (JSON lines or CSV)."""
        rows = reports.requests(since, until, key, team_of(who, team), model, format)
        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(rows, media_type=media)


def add_audit_routes(r: FastAPI, accounts: Accounts, reports: Reports) -> None:
    """The audit log and its verification."""

    @r.get("/admin/v1/audit")
    async def audit(since: Time = None, until: Time = None, actor: Text = None, action: Text = None,
                    offset: Offset = 0, limit: Annotated[int, Query(ge=1, le=AUDIT_MAX_LIMIT)] = AUDIT_DEFAULT_LIMIT,
                    newest_first: bool = False, _: Principal = need(accounts, "audit.read")) -> dict[str, Any]:
        """A page of audit records in order (or newest first), filtered by time [since, until), actor and action."""
        rows, more = await reports.audit(since, until, actor, action, offset, limit, newest_first)
        return listing(rows, AuditRecord.public, Paging(offset, limit), has_more=more)

    @r.get("/admin/v1/audit/verify")
    async def audit_verify(_: Principal = need(accounts, "audit.read")) -> dict[str, Any]:
        """Walk the whole chain: ok, the number of records, the head hash, and the first bad record."""
        return (await reports.verify_audit()).public()
