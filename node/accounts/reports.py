"""Reading the records back: usage totals, ledger rows and the audit log, bounded and off the event loop.

Every read runs in a worker thread. A usage report returns at most a page of groups
and is stopped by the database past `REPORT_TIMEOUT_S`; at most `REPORT_SLOTS` run at
once (the rest wait their turn, up to the same time, then get 503), so no caller can
fill the node's memory or keep the database from the ledger's writes for long.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from node.accounts.audit import AuditRecord, Verdict, verify
from node.accounts.storage import Storage, StorageTimeout, UsageRow
from node.accounts.storage.sql import USAGE_COLUMNS
from node.errors import InvalidRequest, NodeError

REPORT_TIMEOUT_S = 10.0     # a usage report past this is stopped: narrow its window or filters
REPORT_SLOTS = 2            # usage reports running at once
EXPORT_PAGE = 1000          # ledger rows per database read while streaming an export
# A cell a spreadsheet would read as a formula (or as the start of one): written with a leading '.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class ReportBusy(NodeError):
    status = 503
    code = "report_busy"


class Reports:
    """Usage totals, ledger exports and the audit log, for the admin API and key holders."""

    def __init__(self, storage: Callable[[], Storage], flush: Callable[[], None],
                 timeout_s: float = REPORT_TIMEOUT_S, slots: int = REPORT_SLOTS) -> None:
        self._storage = storage      # the database the node opened (known only once it has)
        self._flush = flush          # write what the ledger holds in memory, so reports include it
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(slots)

    async def usage(self, groups: list[str], since: float | None, until: float | None, key: str | None,
                    team: str | None, model: str | None, offset: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """One page of usage totals by `groups`, and whether more groups follow."""
        storage = self._storage()
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            raise ReportBusy("other usage reports are running; try again shortly",
                             headers={"retry-after": "5"}) from None
        try:
            await asyncio.to_thread(self._flush)
            rows = await asyncio.to_thread(storage.usage_report, groups, since, until, key, team, model,
                                           limit + 1, offset, self.timeout_s)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="group_by") from None
        except StorageTimeout:
            raise InvalidRequest(f"the report took longer than {self.timeout_s:g} s and was stopped; ask for a "
                                 "shorter since/until window or filter by key, team or model",
                                 code="report_too_large") from None
        finally:
            self._slots.release()
        return rows[:limit], len(rows) > limit

    async def requests(self, since: float | None, until: float | None, key: str | None, team: str | None,
                       model: str | None, fmt: str) -> AsyncIterator[bytes]:
        """Every ledger row in [since, until), oldest first, a page at a time (JSON lines or CSV)."""
        storage = self._storage()
        await asyncio.to_thread(self._flush)
        if fmt == "csv":
            yield (",".join(USAGE_COLUMNS) + "\r\n").encode()
        after = None
        while True:
            page = await asyncio.to_thread(storage.usage_rows, since, until, key, team, model, after, EXPORT_PAGE)
            if not page:
                return
            yield await asyncio.to_thread(render, page, fmt)
            if len(page) < EXPORT_PAGE:
                return
            after = (page[-1].ts, page[-1].request_id)

    async def audit(self, since: float | None, until: float | None, actor: str | None, action: str | None,
                    offset: int, limit: int, newest_first: bool) -> tuple[list[AuditRecord], bool]:
        """One page of audit records, and whether more follow."""
        storage = self._storage()
        rows = await asyncio.to_thread(storage.list_audit, since, until, actor, action, limit + 1, offset, newest_first)
        return rows[:limit], len(rows) > limit

    async def verify_audit(self) -> Verdict:
        """Walk the whole chain, a batch at a time."""
        storage = self._storage()
        return await asyncio.to_thread(lambda: verify(storage.iter_audit()))


def cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula gets a leading '."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def render(page: list[UsageRow], fmt: str) -> bytes:
    """One page of ledger rows as JSON lines or CSV (no header)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        for row in page:
            w.writerow([cell(getattr(row, c)) for c in USAGE_COLUMNS])
        return buf.getvalue().encode()
    return b"".join(json.dumps(asdict(row)).encode() + b"\n" for row in page)
