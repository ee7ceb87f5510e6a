"""PostgreSQL backend through psycopg 3 with a connection pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

# The advisory lock's first key: Infernode's migrations (the second is the schema's hash).
MIGRATION_LOCK = 0x1F0DE


class PostgresBackend:
    placeholder = "%s"
    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool = ConnectionPool(url, min_size=1, max_size=4, open=False, timeout=5,
                                    kwargs={"autocommit": True, "connect_timeout": 5})
        self._opened = False
        self._open_lock = threading.Lock()
        self._local = threading.local()

    def _pool_open(self) -> ConnectionPool:
        with self._open_lock:
            if not self._opened:
                self._pool.open(wait=False)
                self._opened = True
        return self._pool

    @contextmanager
    def transaction(self) -> Iterator[PostgresBackend]:
        with self._pool_open().connection() as conn:
            with conn.transaction():
                self._local.conn = conn
                try:
                    yield self
                finally:
                    self._local.conn = None

    def _run(self, fn):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return fn(conn)
        with self._pool_open().connection() as conn:
            return fn(conn)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._run(lambda c: c.execute(sql, params).rowcount)

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        def go(c: psycopg.Connection) -> None:
            with c.cursor() as cur:
                cur.executemany(sql, rows)
        self._run(go)

    def query(self, sql: str, params: Sequence[Any] = (), timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Rows as dicts; with timeout_s, the server cancels the statement past it (psycopg QueryCanceled)."""
        def go(c: psycopg.Connection) -> list[dict[str, Any]]:
            cur = c.execute(sql, params)
            cols = [d.name for d in cur.description or ()]
            return [dict(zip(cols, row)) for row in cur.fetchall()]
        if timeout_s is None:
            return self._run(go)
        with self.transaction():
            # SET LOCAL: the limit ends with this transaction, the pooled connection keeps its default.
            self.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")
            return self._run(go)

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        """One migrator per schema across every node on the database: a session advisory lock.

        Held on its own connection while the migrations run on others; a second node
        waits here, then finds every step recorded and applies nothing.
        """
        with self._pool_open().connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s::int, hashtext(current_schema()))", (MIGRATION_LOCK,))
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s::int, hashtext(current_schema()))", (MIGRATION_LOCK,))

    def table_exists(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM information_schema.tables WHERE table_name=%s AND table_schema=current_schema()", (name,)))

    def close(self) -> None:
        if self._opened:
            self._pool.close()
            self._opened = False
