"""Ledger rows the database refused: kept in a JSON-lines file, and written again in a form it takes.

A row the database cannot store (a lone surrogate in `user`, a NUL byte) must never take
its batch down with it. The ledger writes such a row alone; when that fails too, the row
is made safe (text re-encoded with backslash escapes, NULs removed, long text cut) and
written again, so usage and budgets still count the request; the original, made safe for
JSON, is kept here with the database's reason for whoever wants to look.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from node.accounts.storage import UsageRow

log = logging.getLogger("infernode.ledger")

MAX_TEXT = 1024             # characters kept of one text field in a made-safe row
MAX_FILE_BYTES = 64 << 20   # past this the quarantine file takes no more rows (they are counted, still written safe)


def safe_text(value: str | None, limit: int = MAX_TEXT) -> str | None:
    """Text any database and any JSON reader takes: valid UTF-8, no NUL, at most `limit` characters."""
    if value is None:
        return None
    out = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return out[:limit]


def safe_row(row: UsageRow) -> UsageRow:
    """A copy of the row whose text fields are made safe (numbers are kept: they are what usage counts)."""
    changes: dict[str, Any] = {f.name: safe_text(getattr(row, f.name)) for f in dataclasses.fields(row)
               if isinstance(getattr(row, f.name), str)}
    return dataclasses.replace(row, **changes)


class Quarantine:
    """The quarantine file (JSON lines under data_dir) and how many rows went to it since start."""

    def __init__(self, path: Path | None, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.count = 0

    def keep(self, row: UsageRow, reason: str, written: bool) -> None:
        """Record one refused row (made safe), why it was refused, and whether its safe copy reached the database."""
        self.count += 1
        log.error("ledger row %s refused by the database (%s); quarantined%s", row.request_id, reason,
                  ", its made-safe copy written" if written else "")
        if self.path is None:
            return
        line = json.dumps({"quarantined_at": time.time(), "reason": safe_text(reason), "written": written,
                           "row": dataclasses.asdict(safe_row(row))}, separators=(",", ":")) + "\n"
        try:
            if self.size() + len(line) > self.max_bytes:
                return
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.error("cannot append to the ledger quarantine %s: %s", self.path, exc)

    def size(self) -> int:
        try:
            return self.path.stat().st_size if self.path else 0
        except FileNotFoundError:
            return 0
