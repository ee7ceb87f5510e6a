"""OpenAI's Files and Batches API on a real node (tiny-chat on llama.cpp), driven by the official `openai` SDK:
a whole round trip, ledger rows, ownership, bad files, cancel, hostile uploads, and a restart mid-batch."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import time

import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL, start_node, wait_until, write_config


def client(node, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)


def jsonl(n: int, model: str = "tiny-chat", tokens: int = 4, start: int = 0) -> bytes:
    return b"".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": model, "max_tokens": tokens, "temperature": 0,
                                         "messages": [{"role": "user", "content": f"hello {i}"}]}}).encode() + b"\n"
                    for i in range(start, start + n))


def finish(c: openai.OpenAI, bid: str, timeout: float = 120, statuses=("completed", "failed", "expired", "cancelled")):
    b = wait_until(lambda: (x := c.batches.retrieve(bid)).status in statuses and x, timeout=timeout, interval=0.3)
    assert b, c.batches.retrieve(bid)
    return b


@pytest.fixture(scope="module")
def batch_node(tmp_path_factory):
    d = tmp_path_factory.mktemp("batches")
    node = start_node(write_config(d, TINY_MODEL, extra="[batches]\nmax_lines = 200\nmax_file_bytes = 262144\n"))
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_round_trip_with_the_openai_sdk(batch_node):
    key = batch_node.create_key()
    c = client(batch_node, key)
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(12))), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes == len(jsonl(12)) and f.filename == "in.jsonl"
    assert c.files.retrieve(f.id).id == f.id and f.id in [x.id for x in c.files.list()]
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"job": "eval-1"})
    assert b.status == "validating" and b.metadata == {"job": "eval-1"}
    done = finish(c, b.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 12 and done.request_counts.completed == 12 and done.request_counts.failed == 0
    assert done.error_file_id is None and done.output_file_id
    lines = [json.loads(x) for x in c.files.content(done.output_file_id).read().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"req-{i}" for i in range(12)]
    first = lines[0]["response"]
    assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
    assert 0 < first["body"]["usage"]["completion_tokens"] <= 4
    assert b.id in [x.id for x in c.batches.list()]
    # Each line is a ledger row: api = batch, the line's id beside the node's.
    sql = f"SELECT api, client_request_id, status FROM usage WHERE client_request_id LIKE '{b.id}-%'"
    rows = wait_until(lambda: len(r := _ledger(batch_node, sql)) == 12 and r, timeout=10) or _ledger(batch_node, sql)
    assert len(rows) == 12 and {r[0] for r in rows} == {"batch"} and {r[2] for r in rows} == {200}


def _ledger(node, sql: str) -> list:
    with sqlite3.connect(node.data_dir / "infernode.db") as db:
        return db.execute(sql).fetchall()


def test_another_key_sees_nothing_and_deletes_nothing(batch_node):
    a, b = client(batch_node, batch_node.create_key()), client(batch_node, batch_node.create_key())
    f = a.files.create(file=("x.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: b.files.retrieve(f.id), lambda: b.files.delete(f.id), lambda: b.batches.retrieve(batch.id),
                 lambda: b.batches.cancel(batch.id), lambda: b.files.content(f.id),
                 lambda: b.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [x.id for x in b.batches.list()] and f.id not in [x.id for x in b.files.list()]
    finish(a, batch.id)


@pytest.mark.parametrize("content, code", [
    (b"not json\n", "invalid_json_line"),
    (jsonl(2)[: jsonl(1).__len__()] * 2, "duplicate_custom_id"),
    (jsonl(1, model="no-such-model"), "model_not_allowed"),
    (jsonl(1).replace(b"/v1/chat/completions", b"/v1/embeddings"), "mismatched_endpoint"),
    (jsonl(201, tokens=1), "too_many_requests"),
])
def test_bad_files_fail_in_validating_and_nothing_runs(batch_node, content, code):
    c = client(batch_node, batch_node.create_key())
    f = c.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")
    b = finish(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert b.status == "failed" and b.errors.data[0].code == code and b.errors.data[0].message
    assert b.request_counts.completed == 0 and b.output_file_id is None


def test_a_key_limited_to_other_models_cannot_batch_this_one(batch_node):
    c = client(batch_node, batch_node.create_key(models=["nothing-here"]))
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
    b = finish(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert b.status == "failed" and b.errors.data[0].code == "model_not_allowed"


def test_bad_requests_get_openai_shaped_4xx(batch_node):
    key = batch_node.create_key()
    c = client(batch_node, key)
    with pytest.raises(openai.BadRequestError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    h = {"authorization": f"Bearer {key}"}
    hostile = [
        ("POST", "/v1/batches", {"content": b"\xff\xfe"}),
        ("POST", "/v1/batches", {"json": {"input_file_id": ["x"], "endpoint": "/v1/chat/completions"}}),
        ("POST", "/v1/batches", {"content": json.dumps({"input_file_id": "f", "endpoint": "/v1/chat/completions",
                                                        "completion_window": "24h", "metadata": {"k": "\ud800"}})}),
        ("POST", "/v1/batches", {"json": {"input_file_id": "f", "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h", "metadata": {str(i): "v" for i in range(40)}}}),
        ("POST", "/v1/files", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("POST", "/v1/files", {"content": b"{}", "headers": {"content-type": "application/json"}}),
        ("GET", "/v1/files?limit=-1", {}), ("GET", "/v1/batches?limit=99999999", {}),
        ("GET", "/v1/batches?after=../../etc", {}), ("GET", "/v1/files/..%2F..%2Fadmin.key/content", {}),
        ("GET", "/v1/batches/" + "x" * 500, {}), ("PUT", "/v1/batches", {}),
    ]
    with httpx.Client(base_url=batch_node.url, headers=h, timeout=10) as http:
        for method, path, kw in hostile:
            headers = {**h, **kw.pop("headers", {})}
            r = http.request(method, path, headers=headers, **kw)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
            assert r.json()["error"]["message"], r.text
        # No key: refused before the body.
        assert httpx.post(batch_node.url + "/v1/files", content=b"x" * 100).status_code == 401
        # An upload over the limit is 413, and the node keeps answering.
        big = http.post("/v1/files", files={"file": ("big.jsonl", b"x" * 400_000)}, data={"purpose": "batch"})
        assert big.status_code == 413
        assert http.get("/v1/batches").status_code == 200


def test_cancel_with_the_sdk(batch_node):
    c = client(batch_node, batch_node.create_key())
    n = 200    # llama-server answers fast: enough lines of 500 tokens that the batch is still running at the cancel
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(n, tokens=500))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: c.batches.retrieve(b.id).request_counts.completed > 0, timeout=60)
    assert c.batches.cancel(b.id).status in ("cancelling", "cancelled")
    done = finish(c, b.id)
    assert done.status == "cancelled" and done.request_counts.completed < n
    assert done.request_counts.completed + done.request_counts.failed == n
    errors = [json.loads(x) for x in c.files.content(done.error_file_id).read().splitlines()]
    assert errors and {(e["error"] or {}).get("code") or e["response"]["status_code"] for e in errors} == {"batch_cancelled"}, errors[:3]


def test_a_restart_mid_batch_loses_no_line_and_runs_none_twice(node_factory):
    node = node_factory()
    key = node.create_key()
    c = client(node, key)
    n = 200
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(n, tokens=500))), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: c.batches.retrieve(b.id).request_counts.completed >= 10, timeout=60)
    assert node.stop(signal.SIGTERM) == 0
    before = _ledger(node, f"SELECT COUNT(*) FROM batch_lines WHERE batch_id = '{b.id}'")[0][0]
    assert 0 < before < n
    again = start_node(node.config, lock=False)
    try:
        again.wait_ready()
        done = finish(client(again, key), b.id, timeout=180)
        assert done.status == "completed" and done.request_counts.completed == n
        out = [json.loads(x) for x in client(again, key).files.content(done.output_file_id).read().splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(n))
        # Lines recorded before the stop were not run again: one ledger row each for them.
        sql = (f"SELECT client_request_id, COUNT(*) FROM usage WHERE client_request_id LIKE '{b.id}-%' "
               "AND status = 200 GROUP BY client_request_id")
        rows = wait_until(lambda: len(r := _ledger(again, sql)) >= n and r, timeout=10) or _ledger(again, sql)
        assert len(rows) == n and max(r[1] for r in rows) == 1
    finally:
        again.stop()


def test_batch_lines_do_not_count_against_rpm(batch_node):
    key = batch_node.create_key(rpm=3)   # the API calls count: upload, create, one retrieve; the 10 lines do not
    c = client(batch_node, key)
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(10))), purpose="batch")
    bid = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
    assert wait_until(lambda: _ledger(batch_node, f"SELECT status FROM batches WHERE id = '{bid}'")[0][0] == "completed",
                      timeout=120)
    b = c.batches.retrieve(bid)
    assert b.status == "completed" and b.request_counts.completed == 10
    with pytest.raises(openai.RateLimitError):
        c.batches.retrieve(bid)
    time.sleep(0.1)
    m = httpx.get(batch_node.url + "/metrics").text
    assert 'infernode_batch_lines_total{result="completed"}' in m and 'infernode_batches{status="completed"}' in m


def test_admin_api_and_cli(batch_node):
    from tests.conftest import run_cli
    team_key = batch_node.create_key(team="red") if _team(batch_node, "red") else None
    other = client(batch_node, batch_node.create_key())
    c = client(batch_node, team_key)
    f = c.files.create(file=("in.jsonl", io.BytesIO(jsonl(2))), purpose="batch")
    mine = finish(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    f2 = other.files.create(file=("in.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
    theirs = other.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    with batch_node.admin() as a:
        listed = {b["id"]: b for b in a.get("/admin/v1/batches", params={"limit": 1000}).json()["data"]}
        assert mine.id in listed and theirs.id in listed and listed[mine.id]["team"] == "red"
        red = a.post("/admin/v1/tokens", json={"name": "red-viewer", "role": "viewer", "team": "red"}).json()["token"]
    with httpx.Client(base_url=batch_node.url, headers={"authorization": f"Bearer {red}"}, timeout=10) as t:
        seen = [b["id"] for b in t.get("/admin/v1/batches").json()["data"]]
        assert mine.id in seen and theirs.id not in seen
        assert t.get(f"/admin/v1/batches/{theirs.id}").status_code == 404
        assert t.post(f"/admin/v1/batches/{mine.id}/cancel").status_code == 403
        assert t.get("/admin/v1/batches", params={"limit": 0}).status_code == 422
    out = run_cli("batches", "list", config=batch_node.config, check=True).stdout
    assert mine.id in out and "completed" in out
    shown = run_cli("batches", "show", mine.id, "--json", config=batch_node.config, check=True).stdout
    assert json.loads(shown)["request_counts"]["completed"] == 2
    bad = run_cli("batches", "cancel", mine.id, config=batch_node.config)
    assert bad.returncode == 1 and "already completed" in bad.stderr + bad.stdout
    finish(other, theirs.id)


def _team(node, name: str) -> bool:
    with node.admin() as a:
        r = a.post("/admin/v1/teams", json={"name": name})
        return r.status_code in (200, 201, 409)
