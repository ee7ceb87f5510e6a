"""SQL for stored files, batches and each batch line's recorded result (a part of SqlStorage).

A line's result has the primary key (batch_id, line): recording it twice is refused by the
database, which is what makes "a line whose result was recorded never runs again" hold
across restarts and between racing writers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from node.batches.records import BatchRecord, BatchStatus, FileRecord, LineResult

FILE_COLUMNS = [f.name for f in fields(FileRecord)]
BATCH_COLUMNS = [f.name for f in fields(BatchRecord)]
LINE_COLUMNS = [f.name for f in fields(LineResult)]


def _batch_params(b: BatchRecord) -> list[Any]:
    out: list[Any] = []
    for n in BATCH_COLUMNS:
        v = getattr(b, n)
        if n in ("metadata", "errors"):
            v = json.dumps(v)
        elif n == "status":
            v = v.value
        out.append(v)
    return out


def _row_to_batch(row: dict[str, Any]) -> BatchRecord:
    row = dict(row)
    row["metadata"] = json.loads(row["metadata"] or "{}")
    row["errors"] = json.loads(row["errors"] or "[]")
    row["status"] = BatchStatus(row["status"])
    for n in ("total", "completed", "failed"):
        row[n] = int(row[n])
    return BatchRecord(**row)


def _row_to_file(row: dict[str, Any]) -> FileRecord:
    return FileRecord(**{**row, "bytes": int(row["bytes"]), "lines": int(row["lines"])})


def _owner_filter(key_id: str | None, team: str | None) -> tuple[str, list[Any]]:
    """WHERE clauses for who may see a row: one key's, one team's, or (both None) everyone's."""
    if key_id is not None:
        return " AND key_id = ?", [key_id]
    if team is not None:
        return " AND team = ?", [team]
    return "", []


class BatchTables:
    """Files, batches and line results on the SqlStorage backend (mixed into SqlStorage)."""

    backend: Any
    _sql: Any
    _guard: Any

    # -- files -------------------------------------------------------------------
    def insert_file(self, record: FileRecord) -> None:
        cols, marks = ", ".join(FILE_COLUMNS), ", ".join("?" for _ in FILE_COLUMNS)
        with self._guard():
            self.backend.execute(self._sql(f"INSERT INTO batch_files ({cols}) VALUES ({marks})"),
                                 [getattr(record, n) for n in FILE_COLUMNS])

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._guard():
            rows = self.backend.query(self._sql("SELECT * FROM batch_files WHERE id = ?"), (file_id,))
        return _row_to_file(rows[0]) if rows else None

    def list_files(self, key_id: str | None, team: str | None, purpose: str | None = None,
                   after: str | None = None, limit: int = 100) -> list[FileRecord]:
        """Newest first, `limit` at most, starting after the file `after` (its created_at, then id)."""
        where, params = _owner_filter(key_id, team)
        if purpose is not None:
            where, params = where + " AND purpose = ?", params + [purpose]
        if after is not None:
            where += (" AND (created_at < (SELECT created_at FROM batch_files WHERE id = ?) OR (created_at = "
                      "(SELECT created_at FROM batch_files WHERE id = ?) AND id < ?))")
            params = params + [after, after, after]
        with self._guard():
            rows = self.backend.query(self._sql(
                f"SELECT * FROM batch_files WHERE 1 = 1{where} ORDER BY created_at DESC, id DESC LIMIT ?"),
                params + [limit])
        return [_row_to_file(r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._guard():
            return self.backend.execute(self._sql("DELETE FROM batch_files WHERE id = ?"), (file_id,)) > 0

    # -- batches -----------------------------------------------------------------
    def insert_batch(self, record: BatchRecord) -> None:
        cols, marks = ", ".join(BATCH_COLUMNS), ", ".join("?" for _ in BATCH_COLUMNS)
        with self._guard():
            self.backend.execute(self._sql(f"INSERT INTO batches ({cols}) VALUES ({marks})"), _batch_params(record))

    def save_batch(self, record: BatchRecord) -> None:
        sets = ", ".join(f"{c} = ?" for c in BATCH_COLUMNS if c != "id")
        params = _batch_params(record)
        with self._guard():
            self.backend.execute(self._sql(f"UPDATE batches SET {sets} WHERE id = ?"), params[1:] + [record.id])

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._guard():
            rows = self.backend.query(self._sql("SELECT * FROM batches WHERE id = ?"), (batch_id,))
        return _row_to_batch(rows[0]) if rows else None

    def list_batches(self, key_id: str | None, team: str | None, after: str | None = None, limit: int = 20,
                     statuses: tuple[BatchStatus, ...] = ()) -> list[BatchRecord]:
        """Newest first, `limit` at most, after the batch `after`; only `statuses` when given."""
        where, params = _owner_filter(key_id, team)
        if statuses:
            where += f" AND status IN ({', '.join('?' for _ in statuses)})"
            params += [s.value for s in statuses]
        if after is not None:
            where += (" AND (created_at < (SELECT created_at FROM batches WHERE id = ?) OR (created_at = "
                      "(SELECT created_at FROM batches WHERE id = ?) AND id < ?))")
            params = params + [after, after, after]
        with self._guard():
            rows = self.backend.query(self._sql(
                f"SELECT * FROM batches WHERE 1 = 1{where} ORDER BY created_at DESC, id DESC LIMIT ?"), params + [limit])
        return [_row_to_batch(r) for r in rows]

    def batch_counts(self) -> dict[str, int]:
        """Batches per status, every owner's (the metrics' gauge)."""
        with self._guard():
            rows = self.backend.query("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    # -- line results ------------------------------------------------------------
    def record_lines(self, results: list[LineResult]) -> list[bool]:
        """Record lines' results in one transaction (one commit); for each, whether it was new (a line
        already recorded is left as it was)."""
        cols, marks = ", ".join(LINE_COLUMNS), ", ".join("?" for _ in LINE_COLUMNS)
        sql = self._sql(f"INSERT INTO batch_lines ({cols}) VALUES ({marks}) ON CONFLICT (batch_id, line) DO NOTHING")
        with self._guard(), self.backend.transaction() as tx:
            return [tx.execute(sql, [getattr(r, n) for n in LINE_COLUMNS]) > 0 for r in results]

    def recorded_lines(self, batch_id: str) -> set[int]:
        with self._guard():
            rows = self.backend.query(self._sql("SELECT line FROM batch_lines WHERE batch_id = ?"), (batch_id,))
        return {int(r["line"]) for r in rows}

    def line_counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) lines recorded for a batch."""
        with self._guard():
            rows = self.backend.query(self._sql(
                "SELECT SUM(CASE WHEN error_code IS NULL AND status_code >= 200 AND status_code < 300 THEN 1 ELSE 0 END)"
                " AS ok, COUNT(*) AS n FROM batch_lines WHERE batch_id = ?"), (batch_id,))
        ok, n = int(rows[0]["ok"] or 0), int(rows[0]["n"] or 0)
        return ok, n - ok

    def iter_lines(self, batch_id: str, page: int = 1000) -> Iterator[LineResult]:
        """A batch's recorded results in line order, read a page at a time."""
        last = -1
        while True:
            with self._guard():
                rows = self.backend.query(self._sql(
                    "SELECT * FROM batch_lines WHERE batch_id = ? AND line > ? ORDER BY line LIMIT ?"),
                    (batch_id, last, page))
            for r in rows:
                yield LineResult(**{**r, "line": int(r["line"]), "status_code": int(r["status_code"])})
            if len(rows) < page:
                return
            last = int(rows[-1]["line"])
