"""One ledger row the database refuses never costs the others: SQLite and PostgreSQL, and a real node.

A lone surrogate (`"user": "\\ud800"` is valid JSON) cannot be encoded for either database,
and PostgreSQL refuses NUL in text; such a row is written alone, quarantined, and its
made-safe copy written, so N requests are N rows and budgets survive a restart.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.accounts.ledger import Ledger, rebuild_counters
from node.accounts.quarantine import safe_row
from node.accounts.quotas import Quotas
from node.accounts.storage import UsageRow, open_storage
from tests.test_storage import make_db_url

BAD_USERS = ["\ud800", "ok\udfffthen", "nul\x00byte"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> Iterator[str]:
    yield from make_db_url(request.param, tmp_path)


def row(rid: str, key: str, user: str | None = None, ts: float | None = None) -> UsageRow:
    return UsageRow(request_id=rid, ts=ts or time.time(), key_id=key, team=None, model="m", endpoint="chat",
                    end_user=user, prompt_tokens=3, completion_tokens=4, status=200, latency_ms=10.0, ttft_ms=2.0,
                    cost=0.0)


def test_safe_row_is_encodable_and_keeps_the_numbers() -> None:
    r = row("a", "k", user="x\ud800\x00" + "y" * 5000)
    s = safe_row(r)
    assert s.end_user is not None and "\x00" not in s.end_user and len(s.end_user) <= 1024
    s.end_user.encode("utf-8")                        # would raise on a surrogate
    assert (s.prompt_tokens, s.completion_tokens, s.key_id) == (3, 4, "k")


def test_one_bad_row_never_drops_its_batch(db_url: str, tmp_path: Path) -> None:
    storage = open_storage(db_url)
    storage.migrate()
    qfile = tmp_path / "ledger.quarantine.jsonl"
    ledger = Ledger(storage, interval=3600, batch=500, quarantine_path=qfile)
    n, bad = 2000, 0
    for i in range(n):
        user = BAD_USERS[i % 3] if i % 97 == 0 else f"user{i}"
        bad += i % 97 == 0
        ledger.record(row(f"r{i}", f"key{i % 13}", user))
    assert ledger.flush() is True
    rows = storage.usage_since(0)
    assert len(rows) == n                            # every request is a row, the refused ones made safe
    assert ledger.written == n and ledger.dropped == 0
    st = ledger.stats()
    # on SQLite a NUL is stored fine; a surrogate never is; PostgreSQL refuses both
    assert st["quarantined"] == ledger.quarantine.count >= bad * 2 // 3 and st["quarantined"] <= bad
    kept = [json.loads(line) for line in qfile.read_text(encoding="utf-8").splitlines()]
    assert len(kept) == st["quarantined"] and all(k["written"] for k in kept)
    assert {k["row"]["request_id"] for k in kept} <= {f"r{i}" for i in range(0, n, 97)}
    # usage and budgets are right after a restart: counters rebuilt from the ledger see every token
    totals = storage.usage_totals(0, "key_id")
    assert sum(totals.values()) == n * 7
    storage.close()


def test_refused_rows_in_a_spill_replay_are_quarantined(db_url: str, tmp_path: Path) -> None:
    import dataclasses
    storage = open_storage(db_url)
    storage.migrate()
    spill = tmp_path / "ledger.spill"
    spill.write_text("".join(json.dumps(dataclasses.asdict(row(f"s{i}", "k", "\ud800" if i == 3 else None))) + "\n"
                             for i in range(10)))
    ledger = Ledger(storage, spill_path=spill, quarantine_path=tmp_path / "q.jsonl")
    assert ledger.flush() is True
    assert len(storage.usage_since(0)) == 10 and ledger.quarantine.count == 1 and not spill.exists()
    storage.close()


def test_budgets_survive_a_restart_with_a_refused_row(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'l.db'}")
    storage.migrate()
    ledger = Ledger(storage, interval=3600, quarantine_path=tmp_path / "q.jsonl")
    now = time.time()
    for i in range(50):
        ledger.record(row(f"b{i}", "budgeted", "\ud800" if i % 5 == 0 else None, ts=now))
    ledger.close()
    quotas = Quotas()
    rebuild_counters(storage, quotas, now + 1)
    assert storage.usage_totals(0, "key_id") == {"budgeted": 50 * 7}
    storage.close()


def _rows(data_dir: Path, db_url: str | None = None) -> int:
    if db_url:
        storage = open_storage(db_url)
        try:
            return len(storage.usage_since(0))
        finally:
            storage.close()
    with sqlite3.connect(data_dir / "infernode.db") as db:
        return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def node_db(request, tmp_path: Path) -> Iterator[str | None]:
    """None for the node's default SQLite, else a fresh PostgreSQL schema's URL."""
    if request.param == "sqlite":
        yield None
        return
    yield from make_db_url("postgresql", tmp_path)


def test_node_keeps_every_row_with_lone_surrogates_in_user(node_factory, node_db) -> None:
    """End to end: many keys' requests, some with a lone surrogate in `user` or Anthropic's metadata.user_id."""
    node = node_factory(extra=f'[database]\nurl = "{node_db}"\n' if node_db else "")
    keys = [node.create_key(rpm=10_000) for _ in range(4)]
    sent = 0
    raw_bad = b'"\\ud800"'                         # valid JSON, an unencodable string once decoded
    with httpx.Client(base_url=node.url, timeout=60) as c:
        for i in range(24):
            key = keys[i % 4]
            h = {"authorization": f"Bearer {key}", "content-type": "application/json", "x-api-key": key}
            user = raw_bad if i % 3 == 0 else json.dumps(f"u{i}").encode()
            if i % 2:
                body = (b'{"model":"tiny-chat","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"user":'
                        + user + b'}')
                r = c.post("/v1/chat/completions", content=body, headers=h)
            else:
                body = (b'{"model":"tiny-chat","max_tokens":1,"messages":[{"role":"user","content":"hi"}],'
                        b'"metadata":{"user_id":' + user + b'}}')
                r = c.post("/v1/messages", content=body, headers=h)
            assert r.status_code < 500, r.text
            sent += 1
        status = c.get("/admin/v1/status", headers={"authorization": f"Bearer {node.admin_key}"}).json()
    node.stop()
    assert _rows(node.data_dir, node_db) == sent, "a ledger row was lost"
    led = status["ledger"]
    assert led["dropped"] == 0
    print(f"{'PostgreSQL' if node_db else 'SQLite'}: {sent} requests, {_rows(node.data_dir, node_db)} rows, {led.get('quarantined')} quarantined "
          f"(0 when the door already refuses lone surrogates with 400)")


def test_node_restart_keeps_usage_with_a_refused_row(node_factory, tmp_path: Path) -> None:
    """Rows counted before a restart are still there after it (none erased by a bad neighbour)."""
    node = node_factory(dir=tmp_path / "n")
    key = node.create_key(rpm=10_000)
    h = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    with httpx.Client(base_url=node.url, timeout=60) as c:
        for i in range(6):
            user = b'"\\ud800"' if i == 2 else b'"fine"'
            c.post("/v1/chat/completions", headers={**h, "x-request-id": str(uuid.uuid4())},
                   content=b'{"model":"tiny-chat","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"user":'
                   + user + b'}')
    node.stop()
    before = _rows(node.data_dir)
    assert before == 6
    node = node_factory(dir=tmp_path / "n")
    node.stop()
    assert _rows(node.data_dir) == before
