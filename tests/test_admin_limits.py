"""The admin API's limits against a real node: paged lists, bounded aggregations, the fleet secret for
admins only (every reveal and mint audited), formula-safe CSV, and a paced /v1/me/usage; on SQLite and,
when configured, PostgreSQL. Each node test prints its figures (node CPU ms, RSS) with -s."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from node.accounts.keys import KeyRecord, hash_secret
from node.accounts.reports import Reports, render
from node.accounts.storage import StorageTimeout, UsageRow, open_storage
from node.accounts.storage.sql import KEY_COLUMNS, _key_params
from node.errors import InvalidRequest
from tests.conftest import free_port, run_cli, wait_until
from tests.test_roles import db_extra, healthy, make_token  # noqa: F401  (fixture)
from tests.test_storage import db_url, storage  # noqa: F401  (fixtures)

N_KEYS = 10_016
N_ROWS = 500_000


def node_db(n, extra: str) -> str:
    return extra.split('url = "')[1].split('"')[0] if "url =" in extra else f"sqlite:///{n.data_dir / 'infernode.db'}"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100   # utime, stime in clock ticks (100 Hz)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def seed_keys(url: str, count: int) -> None:
    """`count` keys written in one statement, then one version bump (the node reloads within a second)."""
    s = open_storage(url)
    try:
        now = time.time()
        records = [KeyRecord(id=f"key_{i:08x}", name=f"k{i}", secret_hash=hash_secret(f"sk-seed-{i}"),
                             prefix="sk-seed", team="red" if i % 2 else None, created_at=now + i * 1e-3)
                   for i in range(count)]
        cols = ", ".join(KEY_COLUMNS)
        marks = ", ".join([s.backend.placeholder] * len(KEY_COLUMNS))
        with s.backend.transaction() as tx:
            tx.executemany(f"INSERT INTO keys ({cols}) VALUES ({marks})", [_key_params(r) for r in records])
            tx.execute("UPDATE settings_version SET version = version + 1 WHERE id = 1")
    finally:
        s.close()


def seed_users(url: str, count: int, start: float) -> None:
    """`count` ledger rows, each of a different `user`, generated inside the database."""
    s = open_storage(url)
    try:
        cols = "request_id, ts, key_id, team, model, endpoint, end_user, prompt_tokens, completion_tokens, status, cost, api"
        values = "'r' || i, {p} + i * 0.0001, 'key_a', 'red', 'm', 'chat', 'user-' || i, 3, 4, 200, 0.25, 'openai'"
        if s.backend.name == "sqlite":
            sql = (f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {count - 1}) "
                   f"INSERT INTO usage ({cols}) SELECT {values.format(p='?')} FROM n")
        else:
            sql = f"INSERT INTO usage ({cols}) SELECT {values.format(p='%s')} FROM generate_series(0, {count - 1}) AS i"
        s.backend.execute(sql, (start,))
    finally:
        s.close()


def worst_healthz(n, stop: threading.Event, out: list[float]) -> None:
    """A bystander: /healthz again and again; its worst latency lands in out."""
    with httpx.Client(base_url=n.url, timeout=10) as c:
        while not stop.is_set():
            t = time.monotonic()
            c.get("/healthz")
            out.append(time.monotonic() - t)
            time.sleep(0.01)


def test_a_viewer_pages_ten_thousand_keys_and_a_big_aggregation_stays_bounded(node_factory, db_extra) -> None:  # noqa: F811
    n = node_factory("", ready=False, extra=db_extra)
    assert wait_until(lambda: healthy(n), timeout=60)
    url = node_db(n, db_extra)
    seed_keys(url, N_KEYS)
    seed_users(url, N_ROWS, time.time() - 3600)
    viewer = make_token(n, "viewer")
    pid = n.proc.pid
    with httpx.Client(base_url=n.url, headers={"authorization": f"Bearer {viewer}"}, timeout=60) as c:
        assert wait_until(lambda: c.get("/admin/v1/keys", params={"limit": 1}).json()["total"] == N_KEYS, timeout=10)
        rss0, cpu0 = rss_mib(pid), cpu_s(pid)
        stop, lat = threading.Event(), []
        bystander = threading.Thread(target=worst_healthz, args=(n, stop, lat))
        bystander.start()
        t = time.monotonic()
        for _ in range(20):
            page = c.get("/admin/v1/keys").json()
            assert len(page["data"]) == 100 and page["total"] == N_KEYS and page["has_more"] is True
        list_wall, list_cpu = (time.monotonic() - t) / 20, (cpu_s(pid) - cpu0) / 20
        # Paging walks every key once, a bounded page at a time.
        seen, offset = [], 0
        while True:
            got = c.get("/admin/v1/keys", params={"limit": 1000, "offset": offset}).json()
            seen += [k["id"] for k in got["data"]]
            offset += len(got["data"])
            if not got["has_more"]:
                break
        assert len(seen) == len(set(seen)) == N_KEYS
        for bad in ({"limit": 1001}, {"limit": 0}, {"offset": -1}, {"limit": "x"}):
            r = c.get("/admin/v1/keys", params=bad)
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", bad
        # group_by user over every row: one bounded page of groups, read off the loop.
        cpu1, t = cpu_s(pid), time.monotonic()
        r = c.get("/admin/v1/usage", params={"group_by": "user"})
        agg_wall, agg_cpu = time.monotonic() - t, cpu_s(pid) - cpu1
        stop.set()
        bystander.join()
        body = r.json()
        assert r.status_code == 200 and len(body["data"]) == 1000 and body["has_more"] is True, r.text[:300]
        assert len(r.content) < 512 * 1024
        nxt = c.get("/admin/v1/usage", params={"group_by": "user", "offset": 1000, "limit": 10}).json()
        assert len(nxt["data"]) == 10 and nxt["data"][0]["user"] not in {g["user"] for g in body["data"]}
        assert c.get("/admin/v1/usage", params={"limit": 10_001}).status_code == 422
        rss1, hwm = rss_mib(pid), rss_mib(pid, "VmHWM")
    # The CLI pages through every key.
    listed = json.loads(run_cli("keys", "list", "--json", config=n.config, check=True).stdout)
    assert len({k["id"] for k in listed}) == N_KEYS
    print(f"\n[{url.split(':')[0]}] GET /admin/v1/keys ({N_KEYS} keys, page 100): {list_wall * 1000:.1f} ms wall, "
          f"{list_cpu * 1000:.1f} ms node CPU per call; usage group_by=user over {N_ROWS} rows: "
          f"{agg_wall * 1000:.0f} ms wall, {agg_cpu * 1000:.0f} ms node CPU, {len(r.content)} bytes; "
          f"RSS {rss0:.0f} -> {rss1:.0f} MiB (high-water {hwm:.0f}); bystander /healthz worst {max(lat) * 1000:.0f} ms")
    assert list_cpu < 0.1, f"{list_cpu * 1000:.0f} ms of node CPU per page of keys"
    assert rss1 - rss0 < 64, f"RSS grew {rss1 - rss0:.0f} MiB"
    assert max(lat) < 1.0, f"a bystander's /healthz waited {max(lat):.2f} s"


def test_an_aggregation_past_its_time_is_stopped(storage) -> None:  # noqa: F811
    """The database stops a report past its time (both backends); the service answers 400 report_too_large."""
    rows = [UsageRow(f"r{i}", 1e9 + i, "key_a", None, "m", "chat", f"u{i}", 1, 1, 200, 1.0, 1.0, 0.0)
            for i in range(60_000)]
    storage.insert_usage(rows)
    with pytest.raises(StorageTimeout):
        storage.usage_report(["user"], timeout_s=0.001)
    assert len(storage.usage_report(["user"], limit=5, offset=0, timeout_s=30)) == 5   # the timeout was reset
    assert len(storage.usage_report(["user"])) == 60_000

    async def ask() -> None:
        with pytest.raises(InvalidRequest, match="longer than") as err:
            await Reports(lambda: storage, lambda: None, timeout_s=0.001).usage(["user"], None, None, None, None,
                                                                                 None, 0, 1000)
        assert err.value.code == "report_too_large"
        got, more = await Reports(lambda: storage, lambda: None).usage(["user"], None, None, None, None, None, 10, 20)
        assert len(got) == 20 and more and got[0]["user"] == sorted(f"u{i}" for i in range(60_000))[10]
    asyncio.run(ask())


def test_csv_export_escapes_formulas() -> None:
    hostile = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2", "@SUM(A1)", "\tx", "\rx", "bob", "a=b"]
    page = [UsageRow(f"r{i}", 1e9, "key_a", None, "m", "chat", u, 1, 1, 200, None, None, -0.5, client_request_id=u)
            for i, u in enumerate(hostile)]
    got = list(csv.DictReader(io.StringIO(",".join(UsageRow.__dataclass_fields__) + "\r\n" + render(page, "csv").decode())))
    assert [g["end_user"] for g in got] == ["'" + u for u in hostile[:6]] + ["bob", "a=b"]
    assert [g["client_request_id"] for g in got] == [g["end_user"] for g in got]
    assert {g["cost"] for g in got} == {"-0.5"} and {g["latency_ms"] for g in got} == {""}   # numbers stay numbers
    assert [json.loads(x)["end_user"] for x in render(page, "jsonl").splitlines()] == hostile   # JSON keeps them


def test_export_through_a_node_escapes_formulas(node_factory) -> None:
    n = node_factory("", ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    s = open_storage(f"sqlite:///{n.data_dir / 'infernode.db'}")
    s.insert_usage([UsageRow("r1", time.time() - 10, "key_a", None, "m", "chat", "=HYPERLINK(\"http://evil\")", 1, 1,
                             200, 1.0, 1.0, 0.0), UsageRow("r2", time.time() - 9, "key_a", None, "m", "chat", "ann", 1,
                                                           1, 200, 1.0, 1.0, 0.0)])
    s.close()
    with n.admin() as c:
        r = c.get("/admin/v1/usage/requests", params={"format": "csv"})
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [t["end_user"] for t in table] == ["'=HYPERLINK(\"http://evil\")", "ann"]


def test_fleet_secret_is_for_admins_and_every_reveal_and_mint_is_audited(node_factory) -> None:
    port = free_port()
    fleet = f"""
[fleet.litellm]
url = "http://127.0.0.1:{free_port()}"
advertise_url = "http://127.0.0.1:{port}"
register_on_start = false
"""
    n = node_factory("", ready=False, extra=fleet)
    assert wait_until(lambda: healthy(n), timeout=60)
    operator = make_token(n, "operator")
    with httpx.Client(base_url=n.url, headers={"authorization": f"Bearer {operator}"}, timeout=30) as c:
        r = c.get("/admin/v1/fleet/config")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        assert "sk-" not in r.text
    with n.admin() as c:
        # The node made the fleet key at start (no one saw it): that mint is on the record.
        assert wait_until(lambda: c.get("/admin/v1/audit", params={"action": "fleet."}).json()["data"], timeout=20)
        first, first_secret = (json.loads((n.data_dir / "fleet.key").read_text())[f] for f in ("id", "secret"))
        assert c.get("/admin/v1/fleet/config").status_code == 200
        c.post(f"/admin/v1/keys/{first}/revoke").raise_for_status()
        assert c.get("/admin/v1/fleet/config").status_code == 200      # a new key, minted for this admin's read
        second, second_secret = (json.loads((n.data_dir / "fleet.key").read_text())[f] for f in ("id", "secret"))
        records = c.get("/admin/v1/audit", params={"action": "fleet."}).json()["data"]
        assert c.get("/admin/v1/audit/verify").json()["ok"]
    assert second != first
    assert [(a["action"], a["actor_id"], a["target"]) for a in records] == [
        ("fleet.key.create", "node", first), ("fleet.key.reveal", "bootstrap", first),
        ("fleet.key.create", "node", second), ("fleet.key.reveal", "bootstrap", second)]
    assert [a["changes"].get("minted") for a in records if a["action"] == "fleet.key.reveal"] == [False, True]
    assert first_secret not in json.dumps(records) and second_secret not in json.dumps(records)


def test_me_usage_is_cached_and_paced_per_key(node_factory) -> None:
    n = node_factory("", ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    a, b = n.create_key(name="a"), n.create_key(name="b")

    def me(key: str, since: float) -> httpx.Response:
        return httpx.get(n.url + "/v1/me/usage", params={"since": since}, headers={"authorization": f"Bearer {key}"})
    now = time.time()
    for i in range(12):
        assert me(a, now - 100 - i).status_code == 200
    r = me(a, now - 500)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert me(a, now - 100).status_code == 200          # a cached answer costs nothing
    assert me(b, now - 500).status_code == 200          # another key is not held back
