"""The /v1 gateway through a real `infernode up`: against the stub worker, and against real llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port, start_node, wait_until, write_config
from tests.fakes import openai_worker

MAX_INFLIGHT, MAX_QUEUE, CONTEXT = 2, 1, 4096


def stub_model_toml(port: int, name: str = "stub-model", extra: str = "") -> str:
    return f"""
[[models]]
name = "{name}"
runtime = "external"
url = "http://127.0.0.1:{port}/v1"
max_model_len = {CONTEXT}
max_inflight = {MAX_INFLIGHT}
max_queue = {MAX_QUEUE}
{extra}
"""


@pytest.fixture(scope="module")
def stub_node(tmp_path_factory):
    """A stub worker and a real node serving it as an external model; yields (node, key, stub_url)."""
    d: Path = tmp_path_factory.mktemp("gw")
    port = free_port()
    stub = openai_worker.start(port)
    node = start_node(write_config(d, stub_model_toml(port)))
    try:
        node.wait_ready()
        yield node, node.create_key(), f"http://127.0.0.1:{port}"
    finally:
        node.stop()
        stub.kill()
        stub.wait()


def test_no_ready_replica_is_503(node_factory):
    port = free_port()  # nothing listens there
    node = node_factory(stub_model_toml(port), ready=False)
    assert wait_until(lambda: _up(node.url), timeout=30)
    key = node.create_key()
    r = httpx.post(node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=10,
                   json={"model": "stub-model", "messages": []})
    assert r.status_code == 503 and r.headers["retry-after"].isdigit()
    assert r.json()["error"]["code"] == "model_not_ready"


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- against a real llama.cpp worker -------------------------------------------------
def test_llamacpp_streams_usage_and_context(tiny_node):
    key = tiny_node.create_key()
    c = openai.OpenAI(base_url=tiny_node.url + "/v1", api_key=key, max_retries=0)
    msgs = [{"role": "user", "content": "hello"}]
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"top_k": 1}))
    # llama-cpp-python's own streams have no usage; the node's launch shim adds the exact chunk.
    whole = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, extra_body={"top_k": 1})
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    plain = list(c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=12, stream=True))
    assert all(ch.usage is None for ch in plain)
    comp = list(c.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=6, stream=True))
    assert "".join(ch.choices[0].text for ch in comp if ch.choices)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=4096)
    assert e.value.body["code"] == "context_length_exceeded" and "2048" in e.value.body["message"]
    # A field llama.cpp knows but OpenAI does not is passed through (and honoured).
    r = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=5, extra_body={"top_k": 1, "seed": 1})
    r2 = c.chat.completions.create(model="tiny-chat", messages=msgs, max_tokens=5, extra_body={"top_k": 1, "seed": 2})
    assert r.choices[0].message.content == r2.choices[0].message.content  # top_k=1 is greedy


def test_llamacpp_killed_mid_stream(tiny_node):
    key = tiny_node.create_key()
    [w] = tiny_node.workers()
    body = {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 1900, "stream": True}
    lines = []
    with httpx.stream("POST", tiny_node.url + "/v1/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if len(lines) == 2:
                    os.kill(w["pid"], signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][5:])["error"]
    assert err["source"] == "worker" and "mid-stream" in err["message"]
    assert len(lines) < 1900
    time.sleep(0.1)


def test_every_response_has_a_request_id(stub_node):
    node, key, _ = stub_node
    for path in ("/healthz", "/readyz", "/metrics", "/admin/v1/keys", "/nowhere"):
        r = httpx.get(node.url + path, headers={"x-request-id": "rid-" + path}, timeout=10)
        assert r.headers["x-request-id"] == "rid-" + path, path
        assert len(httpx.get(node.url + path, timeout=10).headers["x-request-id"]) == 32


def test_context_check_work_is_bounded():
    """A 4 MB prompt costs the event loop a bounded scan, and a certain overflow is still refused."""
    from node.gateway import context

    t0 = time.process_time()
    for _ in range(20):
        with pytest.raises(Exception) as e:
            context.check({"prompt": "ab" * (2 << 20), "max_tokens": 1}, "completions", 4096)
        assert "context of 4096 tokens" in str(e.value)
        context.check({"prompt": "a" * (4 << 20), "max_tokens": 1}, "completions", 131072)  # runs: not certain
    per_request_ms = (time.process_time() - t0) / 40 * 1000
    assert per_request_ms < 20, per_request_ms  # a regex over 4 MB costs ~250 ms here
