"""SQLite backend (WAL), through the standard library's sqlite3.

The SQL is the same as PostgreSQL's (node/accounts/storage/sql.py), so no table layer
on top: WAL is one pragma.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class SqliteBackend:
    placeholder = "?"
    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._conn = conn
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[SqliteBackend]:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._connect().execute(sql, params).rowcount

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        with self._lock:
            self._connect().executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = (), timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Rows as dicts; with timeout_s, the statement is interrupted past it (sqlite3.OperationalError)."""
        with self._lock:
            conn = self._connect()
            if timeout_s is not None:
                deadline = time.monotonic() + timeout_s
                # Called every 10,000 virtual-machine steps: cheap, and stops a big GROUP BY within milliseconds.
                conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                cur = conn.execute(sql, params)
                cols = [d[0] for d in cur.description or ()]
                return [dict(zip(cols, row)) for row in cur.fetchall()]
            finally:
                if timeout_s is not None:
                    conn.set_progress_handler(None, 0)

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        """One migrator per database file, across processes: an flock on a file beside it."""
        with open(f"{self.path}.migrate-lock", "a") as f, self._lock:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            yield

    def table_exists(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
