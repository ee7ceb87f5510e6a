"""Per-request usage export (streamed, filtered, JSON lines or CSV) and group_by=month."""

from __future__ import annotations

import csv
import io
import json
import socket
import time

import httpx

from node.accounts.storage import UsageRow, open_storage
from tests.conftest import run_cli, wait_until
from tests.test_roles import healthy, make_token
from tests.test_storage import db_url, storage  # noqa: F401  (fixtures)

JAN = 1767225600.0   # 2026-01-01T00:00:00Z


def row(i: int, ts: float, key: str = "key_a", team: str | None = "red", model: str = "m") -> UsageRow:
    return UsageRow(f"r{i:06d}", ts, key, team, model, "chat", None, 3, 4, 200, 5.0, 1.0, 0.25)


def test_pages_walk_every_row_once_in_order(storage) -> None:  # noqa: F811
    rows = [row(i, JAN + i // 3) for i in range(25)] + [row(100 + i, JAN + 40 * 86400, key="key_b", team="blue")
                                                       for i in range(5)]
    storage.insert_usage(rows)
    seen, after = [], None
    while True:
        page = storage.usage_rows(after=after, limit=4)
        seen += page
        if len(page) < 4:
            break
        after = (page[-1].ts, page[-1].request_id)
    assert [r.request_id for r in seen] == sorted(r.request_id for r in rows)   # ties on ts broken by id
    assert len(storage.usage_rows(team="blue")) == 5 and len(storage.usage_rows(key_id="key_a", until=JAN + 3)) == 9
    months = storage.usage_report(["month"])
    assert [(m["month"], m["requests"]) for m in months] == [("2026-01", 25), ("2026-02", 5)]


def seed(n, count: int, start: float) -> None:
    s = open_storage(f"sqlite:///{n.data_dir / 'infernode.db'}")
    try:
        for b in range(0, count, 5000):
            s.insert_usage([row(i, start + i * 0.001, team="red" if i % 2 else "blue")
                            for i in range(b, min(count, b + 5000))])
    finally:
        s.close()


def test_export_streams_filters_and_formats(node_factory) -> None:
    n = node_factory("", ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    now = time.time()
    seed(n, 30_000, now - 100)
    with n.admin() as c:
        with c.stream("GET", "/admin/v1/usage/requests") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
            assert r.headers.get("transfer-encoding") == "chunked"       # streamed, not one buffered body
            lines = [json.loads(x) for x in r.iter_lines() if x]
        assert len(lines) == 30_000 and lines[0]["request_id"] == "r000000" and lines[0]["cost"] == 0.25
        assert [x["ts"] for x in lines] == sorted(x["ts"] for x in lines)
        r = c.get("/admin/v1/usage/requests", params={"format": "csv", "team": "red", "since": now - 100 + 10,
                                                      "until": now - 100 + 20})
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert r.headers["content-type"].startswith("text/csv") and len(table) == 5000
        assert {t["team"] for t in table} == {"red"} and table[0]["prompt_tokens"] == "3"
        month = time.strftime("%Y-%m", time.gmtime(now - 100))
        got = c.get("/admin/v1/usage", params={"group_by": "month,team"}).json()["data"]
        assert {(g["month"], g["team"], g["requests"]) for g in got} == {(month, "blue", 15000), (month, "red", 15000)}
        for bad in ({"format": "xml"}, {"since": "yesterday"}, {"key": "k" * 1000}):
            r = c.get("/admin/v1/usage/requests", params=bad)
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", bad
        assert c.get("/admin/v1/usage", params={"group_by": "week"}).status_code == 400
    # A team token exports only its team's rows.
    blue = make_token(n, "viewer", "blue")
    with httpx.Client(base_url=n.url, headers={"authorization": f"Bearer {blue}"}, timeout=60) as c:
        teams = {json.loads(x)["team"] for x in c.get("/admin/v1/usage/requests").text.splitlines()}
        assert teams == {"blue"}
        assert c.get("/admin/v1/usage/requests", params={"team": "red"}).status_code == 403
    # The CLI streams the same rows.
    out = run_cli("usage", "--requests", "--format", "csv", "--team", "red", config=n.config, check=True).stdout
    assert len(out.splitlines()) == 15_001 and out.startswith("request_id,ts,")
    # A client that asks and never reads holds no more than a socket's worth; the node keeps answering.
    port = int(n.url.rsplit(":", 1)[1])
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(f"GET /admin/v1/usage/requests HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {n.admin_key}\r\n\r\n"
                  .encode())
    time.sleep(1.0)
    assert healthy(n)
    with n.admin() as c:
        assert c.get("/admin/v1/status").status_code == 200
    stuck.close()
