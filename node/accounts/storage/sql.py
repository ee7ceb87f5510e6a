"""The storage interface and its one SQL implementation, shared by both backends."""

from __future__ import annotations

import json
import operator
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol

from node.accounts.audit import AuditRecord
from node.accounts.keys import KeyRecord
from node.accounts.plans import PlanRecord
from node.accounts.storage.batches import BatchTables
from node.accounts.storage.governance import GovernanceTables
from node.accounts.storage.migrations import MIGRATIONS
from node.accounts.teams import TeamRecord
from node.accounts.tokens import TokenRecord

KEY_COLUMNS = [f.name for f in fields(KeyRecord)]
TEAM_COLUMNS = [f.name for f in fields(TeamRecord)]


class StorageUnavailable(Exception):
    """The database cannot be reached or used right now."""


class StorageConflict(Exception):
    """A write collided with a row that already exists (a duplicate name or id)."""


class StorageRejected(Exception):
    """The database refused a value it was given (text it cannot encode, a NUL byte): the data's fault, not the database's."""


class StorageTimeout(Exception):
    """A read ran past its time limit and was stopped (ask for less)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs the request path ~2 µs per row
class UsageRow:
    """One ledger row: a finished request.

    `request_id` is made by the node, unique per request (the primary key: no client can
    name it); `client_request_id` is the `x-request-id` the client sent, if any.
    """

    request_id: str
    ts: float
    key_id: str | None
    team: str | None
    model: str
    endpoint: str
    end_user: str | None
    prompt_tokens: int
    completion_tokens: int
    status: int
    latency_ms: float | None
    ttft_ms: float | None
    cost: float
    api: str = "openai"              # the client API: openai, anthropic, responses, ollama
    client_request_id: str | None = None


USAGE_COLUMNS = [f.name for f in fields(UsageRow)]
# dataclasses.astuple deep-copies every field; this is a plain read, in column order.
_usage_values = operator.attrgetter(*USAGE_COLUMNS)


class Backend(Protocol):
    placeholder: str
    name: str

    def transaction(self) -> Any: ...
    def migration_lock(self) -> AbstractContextManager[None]: ...
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None: ...
    def query(self, sql: str, params: Sequence[Any] = (), timeout_s: float | None = None) -> list[dict[str, Any]]: ...
    def table_exists(self, name: str) -> bool: ...
    def close(self) -> None: ...


class Storage(Protocol):
    backend: Backend

    def migrate(self) -> list[str]: ...
    def applied_migrations(self) -> list[str]: ...
    def insert_key(self, record: KeyRecord) -> None: ...
    def save_key(self, record: KeyRecord) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self) -> list[KeyRecord]: ...
    def keys_version(self) -> int: ...
    def insert_team(self, record: TeamRecord) -> None: ...
    def save_team(self, record: TeamRecord) -> None: ...
    def delete_team(self, name: str) -> bool: ...
    def list_teams(self) -> list[TeamRecord]: ...
    def insert_token(self, record: TokenRecord) -> None: ...
    def save_token(self, record: TokenRecord) -> None: ...
    def list_tokens(self) -> list[TokenRecord]: ...
    def insert_plan(self, record: PlanRecord) -> None: ...
    def save_plan(self, record: PlanRecord) -> None: ...
    def delete_plan(self, name: str) -> bool: ...
    def list_plans(self) -> list[PlanRecord]: ...
    def append_audit(self, record: AuditRecord) -> AuditRecord: ...
    def list_audit(self, since: float | None = None, until: float | None = None, actor: str | None = None,
                   action: str | None = None, limit: int = 1000, offset: int = 0,
                   newest_first: bool = False) -> list[AuditRecord]: ...
    def iter_audit(self, batch: int = 1000) -> Iterator[AuditRecord]: ...
    def insert_usage(self, rows: list[UsageRow]) -> None: ...
    def usage_since(self, since: float) -> list[UsageRow]: ...
    def usage_totals(self, since: float, column: str) -> dict[str, int]: ...
    def cost_totals(self, since: float, column: str) -> dict[str, float]: ...
    def usage_report(self, group_by: list[str], since: float | None = None, until: float | None = None,
                     key_id: str | None = None, team: str | None = None, model: str | None = None,
                     limit: int | None = None, offset: int = 0,
                     timeout_s: float | None = None) -> list[dict[str, Any]]: ...
    def usage_rows(self, since: float | None = None, until: float | None = None, key_id: str | None = None,
                   team: str | None = None, model: str | None = None, after: tuple[float, str] | None = None,
                   limit: int = 1000) -> list[UsageRow]: ...
    def close(self) -> None: ...


def _row_to_key(row: dict[str, Any]) -> KeyRecord:
    row = dict(row)
    row["models"] = tuple(json.loads(row["models"])) if row["models"] is not None else None
    row["metadata"] = json.loads(row["metadata"] or "{}")
    row["revoked"] = bool(row["revoked"])
    return KeyRecord(**row)


def _row_to_team(row: dict[str, Any]) -> TeamRecord:
    row = dict(row)
    row["metadata"] = json.loads(row["metadata"] or "{}")
    return TeamRecord(**row)


def _key_params(record: KeyRecord | TeamRecord, columns: list[str] = KEY_COLUMNS) -> list[Any]:
    values = []
    for name in columns:
        v = getattr(record, name)
        if name == "models":
            v = json.dumps(list(v)) if v is not None else None
        elif name == "metadata":
            v = json.dumps(v)
        elif name == "revoked":
            v = int(v)
        values.append(v)
    return values


USAGE_GROUPS = {"key": "key_id", "team": "team", "model": "model", "user": "end_user", "api": "api",
                "day": None, "month": None}
# Calendar buckets (UTC) per backend.
_BUCKETS = {
    ("day", "postgresql"): "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    ("day", "sqlite"): "strftime('%Y-%m-%d', ts, 'unixepoch')",
    ("month", "postgresql"): "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM')",
    ("month", "sqlite"): "strftime('%Y-%m', ts, 'unixepoch')",
}


class SqlStorage(GovernanceTables, BatchTables):
    """Keys, teams, tokens, plans, audit and ledger on a SQL backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.p = backend.placeholder

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Map driver errors: duplicates to StorageConflict, the rest to StorageUnavailable."""
        try:
            yield
        except Exception as exc:
            names = {c.__name__ for c in type(exc).__mro__}
            if "IntegrityError" in names:
                raise StorageConflict(str(exc).splitlines()[0]) from exc
            # a lone surrogate cannot be encoded (UnicodeEncodeError, before the driver sends it); PostgreSQL
            # refuses NUL in text (DataError): neither means the database is away
            if isinstance(exc, UnicodeError) or "DataError" in names:
                raise StorageRejected(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
            # sqlite3's progress handler stops a statement as "interrupted"; PostgreSQL cancels it.
            if (isinstance(exc, sqlite3.OperationalError) and str(exc) == "interrupted") or type(exc).__name__ == "QueryCanceled":
                raise StorageTimeout(str(exc).splitlines()[0]) from exc
            if isinstance(exc, sqlite3.DatabaseError):
                raise StorageUnavailable(f"sqlite: {exc}") from exc
            if type(exc).__module__.startswith(("psycopg", "psycopg_pool")):
                raise StorageUnavailable(f"postgresql: {exc}") from exc
            raise

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.p) if self.p != "?" else sql

    def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded; return their names."""
        applied_now = []
        with self._guard(), self.backend.migration_lock():
            self.backend.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            for name, statements in MIGRATIONS:
                with self.backend.transaction() as tx:
                    rows = tx.query(self._sql("SELECT name FROM schema_migrations WHERE name = ?"), (name,))
                    if rows:
                        continue
                    for stmt in statements:
                        tx.execute(stmt)
                    tx.execute(self._sql("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)"), (name, time.time()))
                    applied_now.append(name)
        return applied_now

    def applied_migrations(self) -> list[str]:
        with self._guard():
            if not self.backend.table_exists("schema_migrations"):
                return []
            return [r["name"] for r in self.backend.query("SELECT name FROM schema_migrations ORDER BY name")]

    # -- keys and teams ----------------------------------------------------------
    def _write_setting(self, sql: str, params: list[Any]) -> int:
        """One key/team write plus the version bump other nodes poll, in one transaction."""
        with self._guard():
            with self.backend.transaction() as tx:
                n = tx.execute(self._sql(sql), params)
                tx.execute("UPDATE settings_version SET version = version + 1 WHERE id = 1")
        return n

    def insert_key(self, record: KeyRecord) -> None:
        cols = ", ".join(KEY_COLUMNS)
        marks = ", ".join("?" for _ in KEY_COLUMNS)
        self._write_setting(f"INSERT INTO keys ({cols}) VALUES ({marks})", _key_params(record))

    def save_key(self, record: KeyRecord) -> None:
        sets = ", ".join(f"{c} = ?" for c in KEY_COLUMNS if c != "id")
        params = _key_params(record)
        self._write_setting(f"UPDATE keys SET {sets} WHERE id = ?", params[1:] + [record.id])

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._guard():
            rows = self.backend.query(self._sql("SELECT * FROM keys WHERE id = ?"), (key_id,))
        return _row_to_key(rows[0]) if rows else None

    def list_keys(self) -> list[KeyRecord]:
        with self._guard():
            return [_row_to_key(r) for r in self.backend.query("SELECT * FROM keys ORDER BY created_at")]

    def keys_version(self) -> int:
        """A counter bumped by every key or team write, on any node sharing this database."""
        with self._guard():
            return int(self.backend.query("SELECT version FROM settings_version WHERE id = 1")[0]["version"])

    def insert_team(self, record: TeamRecord) -> None:
        cols = ", ".join(TEAM_COLUMNS)
        marks = ", ".join("?" for _ in TEAM_COLUMNS)
        self._write_setting(f"INSERT INTO teams ({cols}) VALUES ({marks})", _key_params(record, TEAM_COLUMNS))

    def save_team(self, record: TeamRecord) -> None:
        sets = ", ".join(f"{c} = ?" for c in TEAM_COLUMNS if c != "name")
        params = _key_params(record, TEAM_COLUMNS)
        self._write_setting(f"UPDATE teams SET {sets} WHERE name = ?", params[1:] + [record.name])

    def delete_team(self, name: str) -> bool:
        return self._write_setting("DELETE FROM teams WHERE name = ?", [name]) > 0

    def list_teams(self) -> list[TeamRecord]:
        with self._guard():
            return [_row_to_team(r) for r in self.backend.query("SELECT * FROM teams ORDER BY name")]

    # -- ledger ----------------------------------------------------------------
    def insert_usage(self, rows: list[UsageRow]) -> None:
        """Insert ledger rows; a row already present (a replayed spill: same node-made id) is skipped."""
        if not rows:
            return
        cols = ", ".join(USAGE_COLUMNS)
        marks = ", ".join("?" for _ in USAGE_COLUMNS)
        sql = self._sql(f"INSERT INTO usage ({cols}) VALUES ({marks}) ON CONFLICT (request_id) DO NOTHING")
        with self._guard():
            with self.backend.transaction() as tx:
                tx.executemany(sql, [_usage_values(r) for r in rows])

    def usage_since(self, since: float) -> list[UsageRow]:
        cols = ", ".join(USAGE_COLUMNS)
        with self._guard():
            rows = self.backend.query(self._sql(f"SELECT {cols} FROM usage WHERE ts >= ? ORDER BY ts"), (since,))
        return [UsageRow(**r) for r in rows]

    def usage_totals(self, since: float, column: str) -> dict[str, int]:
        """Tokens (prompt + completion) since a time, summed by key_id or team."""
        if column not in ("key_id", "team"):
            raise ValueError(f"cannot total by {column!r}")
        sql = (f"SELECT {column} AS k, SUM(prompt_tokens + completion_tokens) AS n FROM usage "
               f"WHERE ts >= ? AND {column} IS NOT NULL GROUP BY {column}")
        with self._guard():
            rows = self.backend.query(self._sql(sql), (since,))
        return {r["k"]: int(r["n"] or 0) for r in rows}

    def cost_totals(self, since: float, column: str) -> dict[str, float]:
        """Money (the ledger's cost) since a time, summed by key_id or team."""
        if column not in ("key_id", "team"):
            raise ValueError(f"cannot total by {column!r}")
        sql = (f"SELECT {column} AS k, SUM(cost) AS n FROM usage "
               f"WHERE ts >= ? AND {column} IS NOT NULL GROUP BY {column}")
        with self._guard():
            rows = self.backend.query(self._sql(sql), (since,))
        return {r["k"]: float(r["n"] or 0) for r in rows}

    def usage_report(self, group_by: list[str], since: float | None = None, until: float | None = None,
                     key_id: str | None = None, team: str | None = None, model: str | None = None,
                     limit: int | None = None, offset: int = 0,
                     timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Totals grouped by any of key, team, model, user, api, day, month (UTC), at most `limit` groups.

        Past timeout_s the database stops the query (StorageTimeout).
        """
        select: list[str] = []
        group: list[str] = []
        for g in group_by:
            if g not in USAGE_GROUPS:
                raise ValueError(f"cannot group by {g!r}; use {', '.join(USAGE_GROUPS)}")
            expr = USAGE_GROUPS[g] or _BUCKETS[(g, self.backend.name)]
            select.append(f"{expr} AS {g}")
            group.append(expr)
        where, params = _usage_filters(since, until, key_id, team, model)
        sql = "SELECT " + ", ".join(select + [
            "COUNT(*) AS requests",
            "SUM(prompt_tokens) AS prompt_tokens",
            "SUM(completion_tokens) AS completion_tokens",
            "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors",
            "SUM(cost) AS cost",
        ]) + " FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if group:
            sql += " GROUP BY " + ", ".join(group) + " ORDER BY " + ", ".join(group)
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [limit, offset]
        with self._guard():
            rows = self.backend.query(self._sql(sql), params, timeout_s)
        for r in rows:
            for k in ("requests", "prompt_tokens", "completion_tokens", "errors"):
                r[k] = int(r[k] or 0)
            r["cost"] = float(r["cost"] or 0)
        return rows

    def usage_rows(self, since: float | None = None, until: float | None = None, key_id: str | None = None,
                   team: str | None = None, model: str | None = None, after: tuple[float, str] | None = None,
                   limit: int = 1000) -> list[UsageRow]:
        """One page of ledger rows in (ts, request_id) order, after the page that ended at `after`."""
        where, params = _usage_filters(since, until, key_id, team, model)
        if after is not None:
            where.append("(ts > ? OR (ts = ? AND request_id > ?))")
            params += [after[0], after[0], after[1]]
        sql = f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts, request_id LIMIT ?"
        params.append(limit)
        with self._guard():
            return [UsageRow(**r) for r in self.backend.query(self._sql(sql), params)]

    def close(self) -> None:
        self.backend.close()


def _usage_filters(since: float | None, until: float | None, key_id: str | None, team: str | None,
                   model: str | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for cond, value in (("ts >= ?", since), ("ts < ?", until), ("key_id = ?", key_id), ("team = ?", team),
                        ("model = ?", model)):
        if value is not None:
            where.append(cond)
            params.append(value)
    return where, params
