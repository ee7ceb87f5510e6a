"""The usage ledger writer: rows queued in memory, written in batches by one thread.

`record` never blocks and never touches the disk; the ledger thread flushes every
`interval` seconds or as soon as `batch` rows wait, and `close` flushes what is left.
When the database is unavailable the thread appends the rows to a bounded spill file
(JSON lines) and replays it, oldest first, once the database answers again; inserts
are idempotent on the node-made request_id, so a replay interrupted half way is simply repeated.
After SIGKILL at most the rows of one interval (those still in memory) are lost.
A batch the database refuses (not unavailable: one row it cannot store) is written row by
row; a row refused alone is quarantined (node/accounts/quarantine.py) and never costs the
others their place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import deque
from pathlib import Path

from node.accounts.quarantine import Quarantine, safe_row
from node.accounts.quotas import WINDOW, Quotas, day_id, month_start
from node.accounts.storage import Storage, StorageUnavailable, UsageRow

log = logging.getLogger("infernode.ledger")


class Ledger:
    """Batches ledger rows off the request path; spills to disk while the database is away."""

    def __init__(self, storage: Storage, *, interval: float = 0.25, batch: int = 500, max_queued: int = 200_000,
                 spill_path: Path | None = None, max_spill_bytes: int = 256 << 20,
                 quarantine_path: Path | None = None) -> None:
        self.storage = storage
        self.interval, self.batch, self.max_queued = interval, batch, max_queued
        self.spill_path = spill_path
        self.max_spill_bytes = max_spill_bytes
        self._queue: deque[UsageRow] = deque()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._io = threading.Lock()           # one flush at a time (thread, admin API, close)
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self.written = 0
        self.failures = 0
        self.dropped = 0
        self.spilled = 0
        self.db_ok = True
        self.quarantine = Quarantine(quarantine_path)  # rows the database refused, kept aside

    def start(self) -> None:
        self._thread.start()

    def record(self, row: UsageRow) -> None:
        """Queue a row (called on the event loop; O(1), no I/O). Past max_queued the row is dropped and counted."""
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            return
        self._queue.append(row)
        if len(self._queue) >= self.batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, float | int | bool]:
        """The ledger's health: rows queued now, written, spilled and dropped since start, spill size, database state."""
        return {"queued": len(self._queue), "written": self.written, "spilled": self.spilled, "dropped": self.dropped,
                "spill_bytes": self.spill_bytes(), "write_failures": self.failures, "database_up": self.db_ok,
                "quarantined": self.quarantine.count, "quarantine_bytes": self.quarantine.size()}

    def spill_bytes(self) -> int:
        try:
            return self.spill_path.stat().st_size if self.spill_path else 0
        except FileNotFoundError:
            return 0

    def _take(self) -> list[UsageRow]:
        rows: list[UsageRow] = []
        while self._queue and len(rows) < self.batch * 4:
            rows.append(self._queue.popleft())
        return rows

    def flush(self) -> bool:
        """Replay any spill, then write everything queued; False when the database was unavailable."""
        with self._io:
            if self.spill_bytes() and not self._replay():
                self._spill_queue()
                return False
            while self._queue:
                rows = self._take()
                try:
                    self.written += self._write(rows)
                except StorageUnavailable as exc:
                    self._went_away(exc)
                    self._queue.extendleft(reversed(rows))
                    self._spill_queue()
                    return False
            self.db_ok = True
            return True

    def _write(self, rows: list[UsageRow]) -> int:
        """Insert a batch; when the database refuses it (a bad row, not an outage), insert row by row.

        Returns the rows that reached the database (a quarantined row's made-safe copy counts)."""
        try:
            self.storage.insert_usage(rows)
            return len(rows)
        except StorageUnavailable:
            raise
        except Exception as exc:  # any refusal: find the row(s) at fault rather than lose the batch
            if len(rows) > 1:
                log.warning("a ledger batch of %d rows was refused (%s); writing it row by row", len(rows), exc)
        written = 0
        for row in rows:
            try:
                self.storage.insert_usage([row])
                written += 1
            except StorageUnavailable:
                raise
            except Exception as exc:
                written += self._quarantine(row, exc)
        return written

    def _quarantine(self, row: UsageRow, exc: Exception) -> bool:
        """Keep the refused row aside and write its made-safe copy, so usage and budgets still count it."""
        self.failures += 1
        try:
            self.storage.insert_usage([safe_row(row)])
            written = True
        except StorageUnavailable:
            raise  # the row goes back to the queue with its batch, and is tried again later
        except Exception:
            written = False
        self.quarantine.keep(row, str(exc) or type(exc).__name__, written=written)
        return written

    def _went_away(self, exc: Exception) -> None:
        self.failures += 1
        if self.db_ok:
            log.error("database unavailable, ledger rows go to %s until it returns: %s", self.spill_path, exc)
        self.db_ok = False

    def _spill_queue(self) -> None:
        """Move queued rows to the spill file (bounded); without a spill file they stay queued."""
        if self.spill_path is None or not self._queue:
            return
        room = self.max_spill_bytes - self.spill_bytes()
        lines, n = [], 0
        while self._queue:
            line = json.dumps(dataclasses.asdict(self._queue[0]), separators=(",", ":")) + "\n"
            if len(line) > room:
                break
            lines.append(line)
            room -= len(line)
            self._queue.popleft()
            n += 1
        if lines:
            with open(self.spill_path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
            self.spilled += n
        if self._queue:
            self.dropped += len(self._queue)
            log.error("ledger spill file %s is full (%d bytes): %d rows dropped", self.spill_path,
                      self.max_spill_bytes, len(self._queue))
            self._queue.clear()

    def _replay(self) -> bool:
        """Insert the spill file's rows; remove it when all are in. False when the database is still away."""
        assert self.spill_path is not None
        rows: list[UsageRow] = []
        with open(self.spill_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(UsageRow(**json.loads(line)))
                except (ValueError, TypeError):
                    log.warning("skipping a torn line in %s", self.spill_path)  # a crash mid-append
        written = 0
        try:
            for i in range(0, len(rows), self.batch * 4):
                written += self._write(rows[i:i + self.batch * 4])
        except StorageUnavailable as exc:
            self._went_away(exc)
            return False
        self.written += written
        self.spill_path.unlink()
        log.warning("database is back: replayed %d ledger rows from %s", len(rows), self.spill_path)
        return True

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the thread must outlive any one bad batch
                log.exception("ledger flush failed")

    def close(self) -> None:
        """Stop the thread and flush (to the database, else to the spill file)."""
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()


def rebuild_counters(storage: Storage, quotas: Quotas, now: float) -> int:
    """Restore rate and budget counters from the ledger (blocking; call before serving).

    Reads the last minute's rows and the token totals of the current UTC day and month,
    so a restart resets neither a rate window nor a budget. Returns the rows read.
    """
    day0, month0 = day_id(now) * 86400.0, month_start(now)
    window = storage.usage_since(now - WINDOW)
    day = {"key": storage.usage_totals(day0, "key_id"), "team": storage.usage_totals(day0, "team")}
    month = {"key": storage.usage_totals(month0, "key_id"), "team": storage.usage_totals(month0, "team")}
    day_usd = {"key": storage.cost_totals(day0, "key_id"), "team": storage.cost_totals(day0, "team")}
    month_usd = {"key": storage.cost_totals(month0, "key_id"), "team": storage.cost_totals(month0, "team")}
    quotas.rebuild(window, day, month, now, day_usd, month_usd)
    return len(window)
