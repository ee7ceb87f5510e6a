"""The ledger: batches off the request path, spill file while the database is away,
replay when it returns, and the SIGKILL loss bound, with real databases and a real node."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.accounts.ledger import Ledger
from node.accounts.storage import UsageRow, open_storage
from tests.conftest import free_port, wait_until

PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


class PrivatePostgres:
    """A throwaway PostgreSQL server (initdb + pg_ctl) in a temp dir, so a test may stop it."""

    def __init__(self) -> None:
        self.bin = Path(PG_BINS[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="infernode-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # PostgreSQL refuses to run as root: run it as the postgres user then.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run(self.prefix + [str(self.bin / args[0]), *args[1:]], check=True, capture_output=True, timeout=120)

    def init(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        subprocess.run(self.prefix + [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                                      "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def can_run_private_postgres() -> bool:
    return bool(PG_BINS) and (os.geteuid() != 0 or shutil.which("runuser") is not None)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if not can_run_private_postgres():
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin) to start a private instance")
    pg = PrivatePostgres().init()
    pg.start()
    yield pg
    pg.destroy()


def row(rid: str, ts: float | None = None) -> UsageRow:
    return UsageRow(request_id=rid, ts=ts or time.time(), key_id="key_a", team=None, model="m", endpoint="chat",
                    end_user=None, prompt_tokens=3, completion_tokens=4, status=200, latency_ms=10.0, ttft_ms=2.0,
                    cost=0.0)


def test_rows_written_in_batches_off_the_request_path(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'l.db'}")
    storage.migrate()
    ledger = Ledger(storage, interval=0.25, batch=1000)
    ledger.start()
    t = time.thread_time()   # this thread's CPU only: the writer thread and a busy machine do not count
    for i in range(2000):
        ledger.record(row(f"r{i}"))
    per_row_us = (time.thread_time() - t) / 2000 * 1e6
    assert per_row_us < 200          # an append to a deque, no I/O
    assert wait_until(lambda: len(storage.usage_since(0)) == 2000, timeout=5, interval=0.05)
    ledger.record(row("late"))
    t = time.monotonic()
    assert wait_until(lambda: len(storage.usage_since(0)) == 2001, timeout=5, interval=0.02)
    assert time.monotonic() - t < 1.0   # flushed within about one interval
    ledger.close()
    storage.close()


def test_close_flushes_everything(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'l.db'}")
    storage.migrate()
    ledger = Ledger(storage, interval=3600, batch=10_000)
    ledger.start()
    for i in range(7):
        ledger.record(row(f"r{i}"))
    assert storage.usage_since(0) == []
    ledger.close()
    assert len(storage.usage_since(0)) == 7
    storage.close()


def test_spill_replay_skips_torn_lines_and_duplicates(tmp_path: Path) -> None:
    import dataclasses
    import json
    storage = open_storage(f"sqlite:///{tmp_path / 'l.db'}")
    storage.migrate()
    storage.insert_usage([row("a")])
    spill = tmp_path / "ledger.spill"
    lines = [json.dumps(dataclasses.asdict(row(r))) for r in ("a", "b", "c")]
    spill.write_text("\n".join(lines) + '\n{"request_id": "d", "ts"')   # killed mid-append
    ledger = Ledger(storage, spill_path=spill)
    assert ledger.flush() is True
    assert sorted(r.request_id for r in storage.usage_since(0)) == ["a", "b", "c"]
    assert not spill.exists()
    storage.close()


def test_spill_file_is_bounded(tmp_path: Path) -> None:
    storage = open_storage(f"postgresql://postgres@127.0.0.1:{free_port()}/none")   # nothing listens there
    spill = tmp_path / "ledger.spill"
    ledger = Ledger(storage, spill_path=spill, max_spill_bytes=3000, batch=10)
    for i in range(100):
        ledger.record(row(f"r{i}"))
    assert ledger.flush() is False
    assert 0 < spill.stat().st_size <= 3000
    assert ledger.spilled + ledger.dropped == 100 and ledger.dropped > 0
    assert ledger.pending == 0
    storage.close()


def test_database_away_rows_spill_and_replay(private_pg: PrivatePostgres, tmp_path: Path) -> None:
    storage = open_storage(private_pg.url)
    storage.migrate()
    spill = tmp_path / "ledger.spill"
    ledger = Ledger(storage, interval=0.05, spill_path=spill)
    ledger.start()
    for i in range(20):
        ledger.record(row(f"before{i}"))
    assert wait_until(lambda: ledger.written == 20, timeout=10, interval=0.05)
    private_pg.stop()
    for i in range(30):
        ledger.record(row(f"during{i}"))
    assert wait_until(lambda: spill.exists() and len(spill.read_text().splitlines()) == 30, timeout=30)
    assert ledger.pending == 0 and not ledger.db_ok
    private_pg.start()
    for i in range(5):
        ledger.record(row(f"after{i}"))
    assert wait_until(lambda: not spill.exists() and ledger.pending == 0, timeout=30)
    ledger.close()
    ids = {r.request_id for r in storage.usage_since(0)}
    assert len(ids) == 55 and {"before0", "during29", "after4"} <= ids
    storage.close()


def chat(url: str, key: str, rid: str) -> httpx.Response:
    """One tiny completion with the client's own x-request-id."""
    return httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}", "x-request-id": rid},
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                      timeout=60)


def test_sigkill_loses_at_most_one_flush_interval(node_factory) -> None:
    node = node_factory()
    key = node.create_key()
    early = [str(uuid.uuid4()) for i in range(10)]
    for rid in early:
        assert chat(node.url, key, rid).status_code == 200
    time.sleep(0.6)                                   # more than two flush intervals (0.25 s)
    late = []
    for _ in range(5):
        rid = str(uuid.uuid4())
        assert chat(node.url, key, rid).status_code == 200
        late.append(rid)
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)
    with sqlite3.connect(node.data_dir / "infernode.db") as db:
        ids = {r[0] for r in db.execute("SELECT client_request_id FROM usage")}
    assert set(early) <= ids, f"rows older than one interval were lost: {set(early) - ids}"
    print(f"SIGKILL: {len(set(late) - ids)} of the {len(late)} rows of the last ~{len(late) * 0.05:.2f}s lost")


def test_node_serves_while_database_is_away(private_pg: PrivatePostgres, node_factory) -> None:
    node = node_factory(extra=f'[database]\nurl = "{private_pg.url}"\n')
    key = node.create_key(rpm=1000)
    sent = []
    for _ in range(3):
        rid = str(uuid.uuid4())
        assert chat(node.url, key, rid).status_code == 200
        sent.append(rid)
    private_pg.stop()
    for _ in range(5):
        rid = str(uuid.uuid4())
        r = chat(node.url, key, rid)
        assert r.status_code == 200, r.text          # keys and quotas are in memory
        sent.append(rid)
    spill = node.data_dir / "ledger.spill"
    assert wait_until(lambda: spill.exists() and len(spill.read_text().splitlines()) >= 5, timeout=30)
    # The ledger's health while the database is away: in /metrics, `status` and `doctor`.
    metrics = httpx.get(node.url + "/metrics", timeout=10).text
    assert "infernode_ledger_database_up 0.0" in metrics
    [spilled] = [float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith("infernode_ledger_rows_spilled_total ")]
    assert spilled >= 5 and "infernode_ledger_rows_dropped_total 0.0" in metrics
    with node.admin() as c:
        led = c.get("/admin/v1/status").json()["ledger"]
    assert led["database_up"] is False and led["spilled"] >= 5 and led["spill_bytes"] > 0 and led["dropped"] == 0
    out = subprocess.run([sys.executable, "-m", "node", "status", "--config", str(node.config)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert "ledger: database unreachable" in out.stdout and f"{led['spilled']} spilled" in out.stdout, out.stdout
    from node.config import load_config
    from node.ops.doctor import check_ledger
    check = check_ledger(load_config(node.config), 10.0)
    assert check.level.value == "fail" and "cannot write usage to the database" in check.detail
    private_pg.start()
    assert wait_until(lambda: not spill.exists(), timeout=30)
    metrics = httpx.get(node.url + "/metrics", timeout=10).text
    assert "infernode_ledger_database_up 1.0" in metrics and "infernode_ledger_spill_bytes 0.0" in metrics
    assert check_ledger(load_config(node.config), 10.0).level.value == "ok"
    with node.admin() as c:
        usage = c.get("/admin/v1/usage", params={"group_by": "key"}).json()["data"]
    assert usage[0]["requests"] == 8
    storage = open_storage(private_pg.url)
    try:
        ids = {r.client_request_id for r in storage.usage_since(0)}
    finally:
        storage.close()
    assert set(sent) <= ids
