"""The /v1 request path in-process (tests/inprocess.py): the gateway's stages against the stub worker, no node process.

What needs a whole node (its dispatcher, /healthz, the admin API, real runtimes) stays in
tests/test_gateway.py; these were moved from there with their assertions unchanged.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from node.gateway.exchange import ModelInfo
from tests.conftest import wait_until
from tests.inprocess import GatewayApp, gateway_app

MAX_INFLIGHT, MAX_QUEUE, CONTEXT = 2, 1, 4096


@pytest.fixture(scope="module")
def stub_node(tmp_path_factory):
    """The stub worker and an in-process gateway serving it as an external model; yields (app, key, stub_url)."""
    model = ModelInfo("stub-model", max_model_len=CONTEXT, max_inflight=MAX_INFLIGHT, max_queue=MAX_QUEUE)
    for app in gateway_app(tmp_path_factory.mktemp("gw"), [model]):
        yield app, app.create_key(), app.stub_url


def events(stub_url: str) -> list[dict]:
    return httpx.get(stub_url + "/stub/events", timeout=5).json()


def last_request(stub_url: str) -> dict:
    return [e for e in events(stub_url) if e["event"] == "request"][-1]


def sse_lines(r: httpx.Response) -> list[str]:
    return [line for line in r.iter_lines() if line.startswith("data:")]


def metric(node: GatewayApp, line_start: str) -> float:
    text = node.metrics_text()
    found = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start + " ")]
    return found[0] if found else 0.0


def by_key_id(node: GatewayApp, secret: str) -> str:
    r = httpx.get(node.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=10)
    assert r.status_code == 200
    record = node.keys.lookup(secret)
    assert record is not None
    return record.id


def test_every_endpoint_through_openai_client(stub_node):
    node, key, stub = stub_node
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    [m] = c.models.list().data
    assert m.id == "stub-model" and m.model_extra["max_model_len"] == CONTEXT

    chat = c.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content == "tok " * 32 and chat.usage.total_tokens == 39

    # Streams without usage asked: the node asks the worker, and hides that chunk.
    chunks = list(c.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "hi"}],
                                            stream=True))
    assert len(chunks) == 32 and all(ch.usage is None and ch.choices for ch in chunks)
    assert last_request(stub)["body"]["stream_options"] == {"include_usage": True}
    chunks = list(c.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32

    comp = c.completions.create(model="stub-model", prompt="Once", max_tokens=3)
    assert comp.choices[0].text.startswith("tok")
    parts = list(c.completions.create(model="stub-model", prompt="Once", max_tokens=3, stream=True))
    assert "".join(p.choices[0].text for p in parts) == "tok " * 32

    emb = c.embeddings.create(model="stub-model", input=["a", "b"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens == 2

    for path in ("/v1/rerank", "/v1/score"):
        r = httpx.post(node.url + path, headers={"authorization": f"Bearer {key}"}, timeout=10,
                       json={"model": "stub-model", "query": "q", "documents": ["x", "y"]})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        assert last_request(stub)["path"] == path


def test_body_passed_unchanged_and_request_id(stub_node):
    node, key, stub = stub_node
    body = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "top_k": 7, "min_p": 0.1,
            "guided_json": {"type": "object"}, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {key}", "x-request-id": "my-req-42"}) as r:
        assert r.headers["x-request-id"] == "my-req-42"
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]
    seen = last_request(stub)
    assert seen["body"] == body and seen["request_id"] == "my-req-42"
    r = httpx.get(node.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert len(r.headers["x-request-id"]) >= 16  # made up by the node when the client sent none


def test_worker_errors_pass_through_marked_worker(stub_node):
    node, key, _ = stub_node
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "x"}],
                                  extra_body={"stub": {"status": 400, "message": "top_k must be positive"}})
    assert e.value.body["message"] == "top_k must be positive" and e.value.body["source"] == "worker"
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "x"}],
                                  extra_body={"stub": {"status": 500, "message": "CUDA error"}})
    assert e.value.status_code == 502 and e.value.body["source"] == "worker"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["source"] == "node" and e.value.body["code"] == "model_not_found"


def test_client_disconnect_cancels_the_worker_request(stub_node):
    node, key, stub = stub_node
    body = {"model": "stub-model", "messages": [], "stream": True, "stub": {"chunks": 200, "chunk_delay_s": 0.05}}
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {key}", "x-request-id": "bye-1"}) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got == 3:
                break
    gone = wait_until(lambda: [e for e in events(stub) if e["event"] == "disconnect" and e["request_id"] == "bye-1"],
                      timeout=10)
    assert gone and gone[0]["after_chunks"] < 100


def test_client_disconnect_cancels_a_non_streamed_request(stub_node):
    node, key, stub = stub_node
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(node.url + "/v1/completions", json={"model": "stub-model", "prompt": "x", "stub": {"delay_s": 5}},
                   headers={"authorization": f"Bearer {key}", "x-request-id": "bye-2"}, timeout=0.5)
    gone = wait_until(lambda: [e for e in events(stub) if e["event"] == "disconnect" and e["request_id"] == "bye-2"],
                      timeout=4)
    assert gone  # the worker saw it long before its 5 s were up


def test_worker_dying_mid_stream_ends_with_error_event(stub_node):
    node, key, _ = stub_node
    body = {"model": "stub-model", "messages": [], "stream": True, "stub": {"die_after": 5}}
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {key}", "x-request-id": "dies-1"}) as r:
        lines = sse_lines(r)
    assert len(lines) == 7 and lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][5:])["error"]
    assert err["source"] == "worker" and err["code"] == "worker_failed" and "mid-stream" in err["message"]
    assert wait_until(lambda: "dies-1" in node.log.read_text() and "mid-stream" in node.log.read_text(), timeout=5)
    # The non-streaming equivalent is a 502 from the worker.
    r = httpx.post(node.url + "/v1/completions", json={"model": "stub-model", "prompt": "x", "stub": {"die_after": 0}},
                   headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200  # die_after only applies to streams; a plain answer is whole
    r = httpx.post(node.url + "/v1/completions", json={"model": "stub-model", "prompt": "x", "stream": True,
                                                       "stub": {"die_after": 0}},
                   headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert '"source": "worker"' in r.text and r.text.endswith("data: [DONE]\n\n")


def test_backpressure_429_with_headers(stub_node):
    node, key, _ = stub_node
    body = {"model": "stub-model", "prompt": "x", "stub": {"delay_s": 1.5}}

    def one(_):
        return httpx.post(node.url + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"},
                          timeout=20)

    n = MAX_INFLIGHT + MAX_QUEUE + 2
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * (MAX_INFLIGHT + MAX_QUEUE) + [429] * 2
    refused = [r for r in results if r.status_code == 429][0]
    assert refused.json()["error"]["code"] == "model_overloaded" and refused.json()["error"]["source"] == "node"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["x-ratelimit-limit-requests"]) == MAX_INFLIGHT + MAX_QUEUE
    metrics = node.metrics_text()
    assert 'infernode_quota_rejections_total{reason="model_capacity"} 2.0' in metrics


def test_bad_bodies(stub_node):
    node, key, _ = stub_node
    auth = {"authorization": f"Bearer {key}"}
    url = node.url + "/v1/chat/completions"
    r = httpx.post(url, headers=auth, content=b"x" * (5 * 1024 * 1024), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for content, param in ((b"{not json", None), (b"[1, 2]", None), (b'{"messages": []}', "model"),
                           ('{"model": "caf\u00e9"}'.encode("latin-1"), None)):  # not UTF-8
        r = httpx.post(url, headers=auth, content=content, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and r.headers["x-request-id"]
    assert httpx.get(url, headers=auth, timeout=10).status_code == 400
    r = httpx.post(node.url + "/v1/nope", headers=auth, json={}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["source"] == "node"


def test_context_check(stub_node):
    node, key, stub = stub_node
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="stub-model", messages=[{"role": "user", "content": "x"}], max_tokens=CONTEXT + 1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    long_prompt = " ".join(str(i) for i in range(40_000))  # > 32 bytes/token * 4096 even with runs collapsed
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="stub-model", prompt=long_prompt, max_tokens=10)
    assert "context of 4096 tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="stub-model", prompt=list(range(4000)), max_tokens=100)
    # Not certainly too long: left to the worker (whitespace runs may be single tokens).
    ok = c.completions.create(model="stub-model", prompt=" " * 200_000, max_tokens=10)
    assert ok.choices[0].text
    ok = c.completions.create(model="stub-model", prompt=list(range(4000)), max_tokens=96)
    assert ok.choices[0].text


def test_ledger_keys_rows_by_node_ids_and_records_real_statuses(stub_node):
    node, _, _ = stub_node
    key_a, key_b = node.create_key(), node.create_key()
    url = node.url + "/v1/chat/completions"
    body = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(10):
        r = httpx.post(url, json=body, headers={"authorization": f"Bearer {key_a}", "x-request-id": "dup"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-request-id"] == "dup"
    # Key B sends the same id (and ids shaped like the node's own): it adds rows, it replaces none.
    for rid in ("dup", "0" * 32):
        r = httpx.post(url, json=body, headers={"authorization": f"Bearer {key_b}", "x-request-id": rid}, timeout=10)
        assert r.status_code == 200
    rows = node.ledger_rows(client_request_id="dup")
    by_key = {}
    for row in rows:
        by_key.setdefault(row["key_id"], []).append(row)
    [a_id] = [k for k in by_key if len(by_key[k]) == 10]
    assert len(by_key) == 2 and len(next(v for k, v in by_key.items() if k != a_id)) == 1
    assert len({row["request_id"] for row in rows}) == 11 and all(len(row["request_id"]) == 32 for row in rows)
    assert all(row["status"] == 200 and row["completion_tokens"] == 32 for row in rows)
    # Real statuses: a worker's 500 is the client's 502, a worker's 400 a 400, the node's own refusals too.
    key_c = node.create_key()
    auth = {"authorization": f"Bearer {key_c}"}
    for stub_status, want in ((500, 502), (400, 400)):
        r = httpx.post(url, json={**body, "stub": {"status": stub_status}}, headers={**auth, "x-request-id": f"s{want}"},
                       timeout=10)
        assert r.status_code == want
    for content, rid in ((b"{nope", "bad-json"), (json.dumps({**body, "max_tokens": CONTEXT + 1}).encode(), "ctx")):
        assert httpx.post(url, content=content, headers={**auth, "x-request-id": rid}, timeout=10).status_code == 400
    got = {row["client_request_id"]: (row["status"], row["model"]) for row in node.ledger_rows(key_id=by_key_id(node, key_c))}
    assert got == {"s502": (502, "stub-model"), "s400": (400, "stub-model"), "bad-json": (400, ""),
                   "ctx": (400, "stub-model")}


def test_rpm_counts_invalid_requests_and_refusals_are_counted_by_reason(stub_node):
    node, _, _ = stub_node
    key = node.create_key(rpm=4)
    url = node.url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {key}"}
    before = {r: metric(node, f'infernode_requests_refused_total{{reason="{r}"}}')
              for r in ("invalid_request", "context_length", "rate_limited", "unauthenticated", "not_found")}
    assert httpx.post(url, content=b"[1]", headers=auth, timeout=10).status_code == 400
    assert httpx.post(url, json={"model": "stub-model", "messages": 5}, headers=auth, timeout=10).status_code == 400
    assert httpx.post(url, json={"model": "stub-model", "max_tokens": CONTEXT * 2}, headers=auth,
                      timeout=10).status_code == 400
    assert httpx.post(url, json={"model": "no-such"}, headers=auth, timeout=10).status_code == 404
    # Four requests in the minute, all refused as invalid: the fifth, valid, is over the rpm.
    r = httpx.post(url, json={"model": "stub-model", "messages": []}, headers=auth, timeout=10)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"]
    assert httpx.post(url, json={}, headers={"authorization": "Bearer sk-wrong"}, timeout=10).status_code == 401
    after = {r: metric(node, f'infernode_requests_refused_total{{reason="{r}"}}') for r in before}
    assert {r: after[r] - before[r] for r in before} == {"invalid_request": 2, "context_length": 1, "rate_limited": 1,
                                                         "unauthenticated": 1, "not_found": 1}


@pytest.mark.parametrize("eol", ["crlf", "cr"])
def test_crlf_and_cr_framed_streams_relayed_event_by_event(stub_node, eol):
    node, key, _ = stub_node
    body = {"model": "stub-model", "messages": [], "stream": True, "stub": {"chunks": 6, "chunk_delay_s": 0.3, "eol": eol}}
    rid = f"eol-{eol}"
    start = time.monotonic()
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}", "x-request-id": rid}) as r:
        arrivals, lines = [], []
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
                lines.append(line)
    assert len(lines) == 7 and lines[-1] == "data: [DONE]"  # 6 chunks (usage chunk hidden) and [DONE]
    assert arrivals[0] < arrivals[-1] - 1.0, arrivals       # the first event came long before the end
    assert all(json.loads(ln[5:])["choices"] for ln in lines[:-1])
    [row] = node.ledger_rows(client_request_id=rid)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 7, 6)
    # With include_usage the client sees the worker's usage chunk.
    body["stub"]["chunk_delay_s"] = 0
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
    chunks = list(c.chat.completions.create(model="stub-model", messages=[], stream=True,
                                            stream_options={"include_usage": True}, extra_body={"stub": body["stub"]}))
    assert len(chunks) == 7 and chunks[-1].usage.completion_tokens == 6



def test_a_stream_is_charged_before_its_end_and_settled_once(stub_node):
    """relay charges the quotas before the client sees [DONE]; settle then adds one ledger row and charges nothing again."""
    node, _, _ = stub_node
    key = node.create_key(tpm=10_000)
    auth = {"authorization": f"Bearer {key}"}

    def remaining() -> int:
        return httpx.get(node.url + "/v1/me", headers=auth, timeout=10).json()["limits"]["key"]["remaining_tokens"]

    body = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={**auth, "x-request-id": "charged-once"}) as r:
        lines = sse_lines(r)
        assert lines[-1] == "data: [DONE]"
        assert remaining() == 10_000 - 39  # 7 prompt + 32 completion tokens, counted by the time [DONE] arrived
    node.idle()
    assert remaining() == 10_000 - 39
    [row] = node.ledger_rows(client_request_id="charged-once")
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, 7, 32)


def test_a_batch_line_outwaits_the_models_queue_timeout(tmp_path):
    """A batch line (node/gateway/inprocess.py) waits past queue_timeout_s, which still bounds a client's wait."""
    from node.gateway import inprocess

    model = ModelInfo("stub-model", max_model_len=CONTEXT, max_inflight=1, max_queue=4, queue_timeout_s=0.2)
    node = GatewayApp(tmp_path, [model]).start()
    try:
        key = node.create_key()
        record = node.keys.lookup(key)
        auth = {"authorization": f"Bearer {key}"}
        slow = {"model": "stub-model", "prompt": "x", "stub": {"delay_s": 1.0}}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = pool.submit(httpx.post, node.url + "/v1/completions", json=slow, headers=auth, timeout=20)
            assert wait_until(lambda: node.gateway.inflight == 1)
            line = node.submit(inprocess.call(
                node.gateway, record, b"/v1/completions", json.dumps({"model": "stub-model", "prompt": "y"}).encode(),
                "batch_x-0"))
            client = httpx.post(node.url + "/v1/completions", json={"model": "stub-model", "prompt": "z"},
                                headers=auth, timeout=20)
            assert client.status_code == 503 and client.json()["error"]["code"] == "queue_timeout"
            assert held.result().status_code == 200
            out = line.result(10)
        assert out.status == 200 and json.loads(out.body)["object"] == "text_completion"
    finally:
        node.stop()


def test_an_interactive_request_preempts_a_running_batch_line(tmp_path):
    """A batch line holding the model while it was quiet is stopped at the worker when a client's request comes."""
    from node.gateway import inprocess

    model = ModelInfo("stub-model", max_model_len=CONTEXT, max_inflight=8, max_queue=8)
    node = GatewayApp(tmp_path, [model]).start()
    try:
        key = node.create_key()
        record = node.keys.lookup(key)
        slow = json.dumps({"model": "stub-model", "prompt": "line", "stub": {"delay_s": 5.0}}).encode()
        line = node.submit(inprocess.call(node.gateway, record, b"/v1/completions", slow, "batch_p-0"))
        assert wait_until(lambda: node.gateway.inflight == 1)
        t0 = time.monotonic()
        r = httpx.post(node.url + "/v1/completions", json={"model": "stub-model", "prompt": "now"},
                       headers={"authorization": f"Bearer {key}"}, timeout=20)
        assert r.status_code == 200
        out = line.result(5)
        assert out.preempted and time.monotonic() - t0 < 2.5     # not the line's 5 s
        assert wait_until(lambda: any(e["event"] == "disconnect" and e["request_id"] == "batch_p-0"
                                      for e in node.events()), timeout=5)  # the worker stopped computing it
        rows = node.ledger_rows(api="batch")
        assert [(row["status"], row["api"]) for row in rows] == [(499, "batch")]
    finally:
        node.stop()
