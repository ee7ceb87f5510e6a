"""Admin routes that read records: usage totals and the audit log (and its verification)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator

from node.accounts.audit import verify
from node.accounts.roles import Principal
from node.accounts.storage.sql import USAGE_COLUMNS
from node.admin.access import need, own_team
from node.admin.protocol import MAX_TIME, check_text
from node.errors import InvalidRequest

if TYPE_CHECKING:  # the running Node is handed in; only node/app.py and node/server.py import the wiring
    from node.app import Node


def _opt_text(v: str | None) -> str | None:
    return None if v is None else check_text(v)


# Query parameters bounded to what the databases hold (422, never 500).
Time = Annotated[float | None, Query(ge=0, le=MAX_TIME, allow_inf_nan=False)]
Text = Annotated[str | None, Query(max_length=200), AfterValidator(_opt_text)]


def add_report_routes(r: FastAPI, node: Node) -> None:
    """Add these routes to the admin app."""

    @r.get("/admin/v1/usage")
    async def usage(group_by: Annotated[str, Query(max_length=200)] = "key,model",
                    since: Time = None, until: Time = None, key: Text = None, team: Text = None, model: Text = None,
                    who: Principal = need(node, "usage.read")) -> dict[str, Any]:
        """Totals grouped by any of key, team, model, user, day, month (UTC) over [since, until)."""
        assert node.storage is not None
        if who.team is not None:
            # A team token sees only its team's usage, whatever it asks for.
            own_team(who, team if team is not None else who.team, f"team '{team}'")
            team = who.team
        groups = [g for g in group_by.split(",") if g]
        if node.ledger is not None:
            await asyncio.to_thread(node.ledger.flush)
        try:
            rows = await asyncio.to_thread(node.storage.usage_report, groups, since, until, key, team, model)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="group_by") from None
        return {"object": "list", "group_by": groups, "since": since, "until": until, "data": rows}

    @r.get("/admin/v1/usage/requests")
    async def usage_requests(since: Time = None, until: Time = None, key: Text = None, team: Text = None,
                             model: Text = None, format: Literal["jsonl", "csv"] = "jsonl",
                             who: Principal = need(node, "usage.read")) -> StreamingResponse:
        """Every ledger row in [since, until), oldest first, streamed a page at a time (JSON lines or CSV)."""
        assert node.storage is not None
        storage = node.storage
        if who.team is not None:
            own_team(who, team if team is not None else who.team, f"team '{team}'")
            team = who.team
        if node.ledger is not None:
            await asyncio.to_thread(node.ledger.flush)

        async def rows() -> AsyncIterator[bytes]:
            if format == "csv":
                yield (",".join(USAGE_COLUMNS) + "\r\n").encode()
            after = None
            while True:
                page = await asyncio.to_thread(storage.usage_rows, since, until, key, team, model, after, PAGE)
                if not page:
                    return
                yield _render(page, format)
                if len(page) < PAGE:
                    return
                after = (page[-1].ts, page[-1].request_id)
        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(rows(), media_type=media)

    @r.get("/admin/v1/audit")
    async def audit(since: Time = None, until: Time = None, actor: Text = None, action: Text = None,
                    limit: int = Query(1000, ge=1, le=10000),
                    _: Principal = need(node, "audit.read")) -> dict[str, Any]:
        """Audit records in order, filtered by time [since, until), actor (token id) and action."""
        assert node.storage is not None
        rows = await asyncio.to_thread(node.storage.list_audit, since, until, actor, action, limit)
        return {"object": "list", "data": [x.public() for x in rows]}

    @r.get("/admin/v1/audit/verify")
    async def audit_verify(_: Principal = need(node, "audit.read")) -> dict[str, Any]:
        """Walk the whole chain: ok, the number of records, the head hash, and the first bad record."""
        assert node.storage is not None
        storage = node.storage
        verdict = await asyncio.to_thread(lambda: verify(storage.iter_audit()))
        return verdict.public()



PAGE = 1000


def _render(page: list[Any], format: str) -> bytes:
    """One page of ledger rows as JSON lines or CSV (no header)."""
    if format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        for row in page:
            w.writerow(["" if v is None else v for v in (getattr(row, c) for c in USAGE_COLUMNS)])
        return buf.getvalue().encode()
    return b"".join(json.dumps(asdict(row)).encode() + b"\n" for row in page)
