"""The audit log: hash chain, concurrent appends, filters, and `infernode audit --verify`
catching a record edited or deleted directly in the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx

from node.accounts.audit import GENESIS, AuditRecord, chain_hash, scrub, verify
from node.accounts.storage import open_storage
from tests.conftest import run_cli, wait_until
from tests.test_roles import db_extra, healthy  # noqa: F401  (fixture)
from tests.test_storage import db_url, storage  # noqa: F401  (fixtures)


def rec(i: int, **kw) -> AuditRecord:
    return AuditRecord(seq=0, ts=1000.0 + i, actor_id="bootstrap", actor_role="admin", source="127.0.0.1",
                       action="keys.create", target=f"key_{i}", changes={"rpm": i, "f": 0.1}, request_id=f"r{i}", **kw)


def chain(n: int) -> list[AuditRecord]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        r = replace(rec(i), seq=i, prev_hash=prev)
        r = replace(r, hash=chain_hash(prev, r))
        out.append(r)
        prev = r.hash
    return out


def test_verify_finds_edits_and_deletions() -> None:
    good = chain(5)
    v = verify(good)
    assert v.ok and v.records == 5 and v.head == good[-1].hash
    edited = list(good)
    edited[2] = replace(good[2], changes={"rpm": 999, "f": 0.1})
    assert verify(edited).bad_seq == 3 and "edited" in verify(edited).problem
    # An editor who also recomputes the record's own hash breaks the next link.
    forged = replace(edited[2], hash=chain_hash(edited[2].prev_hash, edited[2]))
    assert verify(good[:2] + [forged] + good[3:]).bad_seq == 4
    assert verify(good[:1] + good[2:]).bad_seq == 3 and "deleted" in verify(good[:1] + good[2:]).problem
    assert verify(good[1:]).bad_seq == 2          # the first record deleted
    assert verify([]).ok


def test_scrub_drops_secrets() -> None:
    assert scrub({"key": "sk-x", "token": "t", "secret_hash": "h", "rpm": 1}) == {"rpm": 1}


def test_appends_from_many_threads_and_two_connections_keep_one_chain(storage, db_url: str) -> None:  # noqa: F811
    other = open_storage(db_url)  # a second node on the same database
    try:
        def work(s, base: int) -> None:
            for i in range(15):
                s.append_audit(rec(base + i))
        threads = [threading.Thread(target=work, args=(s, b)) for s, b in ((storage, 0), (other, 100), (storage, 200),
                                                                             (other, 300))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        v = verify(storage.iter_audit(batch=7))
        assert v.ok and v.records == 60, v
        assert [r.seq for r in storage.iter_audit()] == list(range(1, 61))
        assert len(storage.list_audit(actor="bootstrap", action="keys.")) == 60
        assert storage.list_audit(action="keys") == [] and storage.list_audit(actor="tok_x") == []
        assert len(storage.list_audit(since=1000.0 + 100, until=1000.0 + 115)) == 15
    finally:
        other.close()


def _edit(extra: str, data_dir: Path, sql: str) -> None:
    """Run SQL on the node's database behind its back, as a tamperer would."""
    if extra:
        import psycopg
        url = extra.split('"')[1]
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(sql)
    else:
        with sqlite3.connect(data_dir / "infernode.db") as c:
            c.execute(sql)


def test_admin_writes_are_audited_and_tampering_is_detected(node_factory, db_extra: str) -> None:  # noqa: F811
    n = node_factory("", extra=db_extra, ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    t0 = time.time()
    with n.admin() as c:
        made = c.post("/admin/v1/keys", json={"name": "a", "rpm": 5}, headers={"x-request-id": "req-create"}).json()
        c.patch(f"/admin/v1/keys/{made['id']}", json={"rpm": 6})
        rotated = c.post(f"/admin/v1/keys/{made['id']}/rotate", json={"grace_s": 30}).json()
        c.post("/admin/v1/teams", json={"name": "red"})
        tok = c.post("/admin/v1/tokens", json={"name": "ops", "role": "operator"}).json()
        c.post("/admin/v1/plans", json={"name": "gold", "rpm": 100})
        c.post(f"/admin/v1/keys/{made['id']}/revoke")
        assert c.post("/admin/v1/reload").status_code == 200
        c.get("/admin/v1/keys")                              # reads are not audited
    with httpx.Client(base_url=n.url, headers={"authorization": f"Bearer {tok['token']}"}) as c:
        assert c.post("/admin/v1/reload").status_code == 200
        assert c.post("/admin/v1/tokens", json={"name": "x", "role": "admin"}).status_code == 403  # not audited
        assert c.get("/admin/v1/audit").status_code == 200   # operators read the log
    out = run_cli("audit", "--json", config=n.config, check=True).stdout
    rows = json.loads(out)
    assert [r["action"] for r in rows] == ["keys.create", "keys.update", "keys.rotate", "teams.create",
                                           "tokens.create", "plans.create", "keys.revoke", "config.reload",
                                           "config.reload"]
    first = rows[0]
    assert first["actor_id"] == "bootstrap" and first["actor_role"] == "admin" and first["source"] == "127.0.0.1"
    assert first["target"] == made["id"] and first["request_id"] == "req-create" and first["changes"]["rpm"] == 5
    assert rows[-1]["actor_id"] == tok["id"] and rows[-1]["actor_role"] == "operator"
    assert t0 - 1 <= first["ts"] <= time.time()
    for secret in (made["key"], rotated["key"], tok["token"], n.admin_key):
        assert secret not in out
    assert "secret_hash" not in out
    with n.admin() as c:
        only = c.get("/admin/v1/audit", params={"actor": tok["id"]}).json()["data"]
        assert [r["action"] for r in only] == ["config.reload"]
        assert len(c.get("/admin/v1/audit", params={"action": "keys."}).json()["data"]) == 4
        assert c.get("/admin/v1/audit", params={"since": time.time() + 60}).json()["data"] == []
        assert c.get("/admin/v1/audit", params={"limit": 0}).status_code == 422
        assert c.get("/admin/v1/audit", params={"since": "yesterday"}).status_code == 422

    ok = run_cli("audit", "--verify", config=n.config, check=True).stdout
    assert "audit chain ok: 9 records" in ok
    # Edit a record's changes behind the node's back: verify fails and names it.
    _edit(db_extra, n.data_dir, "UPDATE audit SET changes = '{\"rpm\": 500}' WHERE seq = 2")
    p = run_cli("audit", "--verify", config=n.config)
    assert p.returncode == 1 and "record 2" in p.stderr
    # Put it back exactly: the chain verifies again; then delete one: verify fails at the next record.
    _edit(db_extra, n.data_dir, "UPDATE audit SET changes = '{\"rpm\": 6}' WHERE seq = 2")
    assert run_cli("audit", "--verify", config=n.config).returncode == 0
    _edit(db_extra, n.data_dir, "DELETE FROM audit WHERE seq = 5")
    p = run_cli("audit", "--verify", config=n.config)
    assert p.returncode == 1 and "record 6" in p.stderr and "deleted" in p.stderr
