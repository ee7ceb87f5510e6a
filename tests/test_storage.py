"""The storage interface, against SQLite always and PostgreSQL when INFERNODE_TEST_POSTGRES_URL is set.

On PostgreSQL every test gets its own schema (search_path set through the URL's
`options`), so parallel runs on one server never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from node.accounts.keys import KeyRecord, hash_secret
from node.accounts.storage import StorageConflict, UsageRow, open_storage
from node.accounts.storage.migrations import MIGRATIONS
from node.accounts.teams import TeamRecord

PG_URL = os.environ.get("INFERNODE_TEST_POSTGRES_URL")


def pg_schema_url(base: str, schema: str) -> str:
    """The URL of `base` with search_path set to `schema`."""
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


def _pg_exec(sql: str) -> None:
    import psycopg
    assert PG_URL
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as c:
        c.execute(sql)


def make_db_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of `kind` (sqlite or postgresql), removed afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not PG_URL:
        pytest.skip("INFERNODE_TEST_POSTGRES_URL is not set")
    schema = "t_" + secrets.token_hex(6)
    _pg_exec(f"CREATE SCHEMA {schema}")
    try:
        yield pg_schema_url(PG_URL, schema)
    finally:
        _pg_exec(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> Iterator[str]:
    """A database URL for each backend (PostgreSQL only when configured)."""
    yield from make_db_url(request.param, tmp_path)


@pytest.fixture
def storage(db_url: str):
    s = open_storage(db_url)
    s.migrate()
    yield s
    s.close()


def key(name: str = "k", **kw) -> KeyRecord:
    secret = "sk-" + secrets.token_hex(8)
    return KeyRecord(id="key_" + secrets.token_hex(4), name=name, secret_hash=hash_secret(secret), prefix=secret[:8], **kw)


def row(rid: str, ts: float, key_id: str = "key_a", team: str | None = None, model: str = "m", p: int = 1,
        c: int = 2, status: int = 200, user: str | None = None, cost: float = 0.0) -> UsageRow:
    return UsageRow(request_id=rid, ts=ts, key_id=key_id, team=team, model=model, endpoint="chat", end_user=user,
                    prompt_tokens=p, completion_tokens=c, status=status, latency_ms=5.0, ttft_ms=1.0, cost=cost)


def test_migrations_apply_once(db_url: str) -> None:
    s = open_storage(db_url)
    try:
        assert s.migrate() == [name for name, _ in MIGRATIONS]
        assert s.migrate() == []
        assert s.applied_migrations() == sorted(name for name, _ in MIGRATIONS)
    finally:
        s.close()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    """Readers never wait on the ledger's writes: the database file is in WAL mode."""
    s = open_storage(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        s.migrate()
        with sqlite3.connect(tmp_path / "wal.db") as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()


def test_nodes_starting_at_once_migrate_once(db_url: str) -> None:
    """Four nodes opening one fresh database together: each step applied by exactly one, none fails."""
    nodes = [open_storage(db_url) for _ in range(4)]
    start = threading.Barrier(len(nodes))
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def boot(s) -> None:
        start.wait()
        try:
            applied.append(s.migrate())
        except BaseException as exc:  # noqa: B036  (reported below, with the others)
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(s,)) for s in nodes]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert sorted(sum(applied, [])) == sorted(name for name, _ in MIGRATIONS)
        assert nodes[0].applied_migrations() == sorted(name for name, _ in MIGRATIONS)
    finally:
        for s in nodes:
            s.close()


def test_keys_round_trip_and_version(storage) -> None:
    v0 = storage.keys_version()
    k = key("alice", team="red", models=("a", "b"), rpm=10, tpm=100, max_parallel=2, budget_tokens=1000,
            budget_period="month", user_rpm=3, user_tpm=30, expires_at=time.time() + 60, metadata={"x": "y"})
    storage.insert_key(k)
    assert storage.keys_version() == v0 + 1
    assert storage.get_key(k.id) == k
    assert storage.list_keys() == [k]
    revoked = k.updated(revoked=True, models=None)
    storage.save_key(revoked)
    assert storage.keys_version() == v0 + 2
    got = storage.get_key(k.id)
    assert got is not None and got.revoked and got.models is None
    with pytest.raises(StorageConflict):
        storage.insert_key(k)  # same id and hash
    assert storage.get_key("key_missing") is None


def test_version_seen_by_a_second_connection(db_url: str, storage) -> None:
    other = open_storage(db_url)
    try:
        v = other.keys_version()
        storage.insert_key(key())
        assert other.keys_version() == v + 1
        assert len(other.list_keys()) == 1
    finally:
        other.close()


def test_teams_crud(storage) -> None:
    t = TeamRecord(name="red", rpm=5, tpm=50, max_parallel=1, budget_tokens=500, budget_period="month",
                   metadata={"owner": "ops"})
    v = storage.keys_version()
    storage.insert_team(t)
    assert storage.list_teams() == [t]
    with pytest.raises(StorageConflict):
        storage.insert_team(t)
    storage.save_team(t.updated(rpm=7))
    assert storage.list_teams()[0].rpm == 7
    assert storage.delete_team("red") is True
    assert storage.delete_team("red") is False
    assert storage.list_teams() == []
    assert storage.keys_version() >= v + 3


def test_usage_insert_is_idempotent(storage) -> None:
    now = time.time()
    rows = [row(f"r{i}", now - i) for i in range(10)]
    storage.insert_usage(rows)
    storage.insert_usage(rows[:5] + [row("r10", now)])  # a replayed spill overlaps what is there
    assert len(storage.usage_since(0)) == 11
    assert [r.request_id for r in storage.usage_since(now - 2.5)] == ["r2", "r1", "r0", "r10"]


def test_usage_report_groups_and_filters(storage) -> None:
    day1 = 1_767_225_600.0            # 2026-01-01T00:00:00Z
    day2 = day1 + 86400
    storage.insert_usage([
        row("a", day1 + 10, key_id="k1", team="red", model="m1", p=10, c=5, cost=0.5),
        row("b", day1 + 20, key_id="k1", team="red", model="m2", p=1, c=1, status=500),
        row("c", day2 + 10, key_id="k2", team="blue", model="m1", p=100, c=50, user="u1", cost=1.5),
        row("d", day2 + 20, key_id="k2", team="blue", model="m1", p=1, c=1, user="u2"),
    ])
    by_key = storage.usage_report(["key"])
    assert [(r["key"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["errors"]) for r in by_key] == [
        ("k1", 2, 11, 6, 1), ("k2", 2, 101, 51, 0)]
    by_day = storage.usage_report(["day", "model"])
    assert [(r["day"], r["model"], r["requests"]) for r in by_day] == [
        ("2026-01-01", "m1", 1), ("2026-01-01", "m2", 1), ("2026-01-02", "m1", 2)]
    by_team = storage.usage_report(["team"], since=day2, until=day2 + 15)
    assert [(r["team"], r["requests"], r["cost"]) for r in by_team] == [("blue", 1, 1.5)]
    assert storage.usage_report(["user"], team="blue")[0]["user"] == "u1"
    assert storage.usage_report([], model="m1")[0]["requests"] == 3
    assert storage.usage_report(["key"], key_id="k2")[0]["completion_tokens"] == 51
    with pytest.raises(ValueError):
        storage.usage_report(["secret_hash"])


def test_usage_totals(storage) -> None:
    now = time.time()
    storage.insert_usage([row("a", now - 100, key_id="k1", team="red", p=3, c=4),
                          row("b", now - 10, key_id="k1", team="red", p=1, c=1),
                          row("c", now - 10, key_id="k2", team=None, p=5, c=5)])
    assert storage.usage_totals(now - 50, "key_id") == {"k1": 2, "k2": 10}
    assert storage.usage_totals(now - 500, "team") == {"red": 9}


def test_migration_003_keeps_rows_and_keys_ledger_by_node_id(db_url: str) -> None:
    """A database at 002 (the client's id as the key) migrates with its rows; from then on
    the same client id any number of times makes that many rows, and counters count them all."""
    from node.accounts.ledger import rebuild_counters
    from node.accounts.quotas import Quotas

    s = open_storage(db_url)
    s.backend.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
    for name, statements in MIGRATIONS[:2]:
        for stmt in statements:
            s.backend.execute(stmt)
        s.backend.execute(s._sql("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)"), (name, 0.0))
    now = time.time()
    s.backend.execute(s._sql("INSERT INTO usage (request_id, ts, key_id, model, endpoint, prompt_tokens, "
                             "completion_tokens, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                      ("old-client-id", now - 1, "key_a", "m", "chat", 3, 4, 200))
    assert s.migrate() == [name for name, _ in MIGRATIONS[2:]]
    [old] = s.usage_since(0)
    assert (old.request_id, old.client_request_id, old.prompt_tokens, old.status) == ("old-client-id", "old-client-id", 3, 200)
    # Ten requests with one client id (and key B reusing it) are eleven rows.
    rows = [row(f"node-{i}", now - 0.5 + i * 0.01) for i in range(10)] + [row("node-b", now, key_id="key_b")]
    for r in rows:
        r.client_request_id = "same-id"
    s.insert_usage(rows)
    got = s.usage_since(0)
    assert len(got) == 12 and sum(r.client_request_id == "same-id" for r in got) == 11
    assert s.usage_report(["key"]) == [
        {"key": "key_a", "requests": 11, "prompt_tokens": 13, "completion_tokens": 24, "errors": 0, "cost": 0.0},
        {"key": "key_b", "requests": 1, "prompt_tokens": 1, "completion_tokens": 2, "errors": 0, "cost": 0.0}]
    quotas = Quotas()
    assert rebuild_counters(s, quotas, now) == 12
    assert len(quotas.counter("key", "key_a").hits) == 11 and quotas.counter("key", "key_a").day_used == 37
    s.close()


def test_usage_rows_keep_every_status(storage) -> None:
    now = time.time()
    storage.insert_usage([row("a", now, status=500), row("b", now, status=502), row("c", now, status=400),
                          row("d", now, status=200)])
    assert sorted(r.status for r in storage.usage_since(0)) == [200, 400, 500, 502]
    [report] = storage.usage_report([])
    assert report["requests"] == 4 and report["errors"] == 3
