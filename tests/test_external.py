"""`runtime = "external"`: a server the node does not launch, behind the node's keys, quotas, metrics and health."""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest

from tests.conftest import free_port, wait_until
from tests.fakes import openai_worker


def ext_toml(port: int) -> str:
    return f"""
[[models]]
name = "ext-model"
runtime = "external"
url = "http://127.0.0.1:{port}/v1"
max_model_len = 8192
"""


def test_external_server_behind_keys_quotas_metrics_and_health(node_factory, tmp_path):
    port = free_port()
    stub = openai_worker.start(port, "--model", "ext-model")
    try:
        node = node_factory(ext_toml(port))
        # Keys: the external server is only reachable through a node key.
        r = httpx.post(node.url + "/v1/chat/completions", json={"model": "ext-model", "messages": []}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["source"] == "node"
        key = node.create_key(rpm=3)
        c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0)
        assert [m.model_extra["max_model_len"] for m in c.models.list().data] == [8192]
        for _ in range(2):
            out = c.chat.completions.create(model="ext-model", messages=[{"role": "user", "content": "hi"}])
            assert out.usage.completion_tokens == 32
        chunks = list(c.chat.completions.create(model="ext-model", messages=[], stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.total_tokens == 39
        # Quotas: the fourth request in a minute is refused with the rate-limit headers.
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="ext-model", messages=[])
        headers = e.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60 and headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        # Metrics: requests, tokens and the worker's state, labelled like any runtime's.
        metrics = httpx.get(node.url + "/metrics", timeout=10).text
        assert 'infernode_requests_total{code="200",model="ext-model"} 3.0' in metrics
        assert 'infernode_tokens_total{kind="completion",model="ext-model"} 96.0' in metrics
        assert 'infernode_worker_up{model="ext-model",replica="0",runtime="external"} 1.0' in metrics
        # Health: the server going away makes the node not ready (503 for clients); its return, ready again.
        stub.kill()
        stub.wait()
        assert wait_until(lambda: httpx.get(node.url + "/readyz", timeout=5).status_code == 503, timeout=30)
        key2 = node.create_key()
        r = httpx.post(node.url + "/v1/chat/completions", json={"model": "ext-model", "messages": []},
                       headers={"authorization": f"Bearer {key2}"}, timeout=10)
        assert r.status_code in (502, 503) and r.json()["error"]["source"] == "node"
        stub = openai_worker.start(port, "--model", "ext-model")
        node.wait_ready(60)
        out = openai.OpenAI(base_url=node.url + "/v1", api_key=key2, max_retries=0).chat.completions.create(
            model="ext-model", messages=[])
        assert out.choices[0].message.content
    finally:
        stub.kill()
        stub.wait()


def test_a_node_fronts_another_node_with_api_key_env(node_factory):
    """Node A serves node B's model as `external` with B's key from api_key_env (probes included);
    the key never shows in A's status; without the variable the model is held with the reason."""
    port = free_port()
    stub = openai_worker.start(port, "--model", "ext-model")
    try:
        node_b = node_factory(ext_toml(port))
        b_key = node_b.create_key()
        assert httpx.get(node_b.url + "/v1/models", timeout=10).status_code == 401  # B needs a key
        a_toml = f"""
[[models]]
name = "ext-model"
runtime = "external"
url = "{node_b.url}/v1"
api_key_env = "NODE_B_KEY"
read_timeout_s = 2
connect_timeout_s = 3
"""
        node_a = node_factory(a_toml, env={"NODE_B_KEY": b_key})  # ready: its probes of B passed with the key
        a_key = node_a.create_key()
        c = openai.OpenAI(base_url=node_a.url + "/v1", api_key=a_key, max_retries=0)
        out = c.chat.completions.create(model="ext-model", messages=[{"role": "user", "content": "hi"}])
        assert out.usage.completion_tokens == 32
        chunks = list(c.chat.completions.create(model="ext-model", messages=[], stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 32
        # B's ledger has the requests under B's key; A's answer came through B.
        with node_b.admin() as admin:
            [row] = admin.get("/admin/v1/usage", params={"group_by": "key"}).json()["data"]
        assert row["requests"] >= 2 and row["completion_tokens"] >= 64
        # read_timeout_s: a worker silent for longer than the model's 2 s is a 504 after ~2 s, not 600 s.
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="ext-model", messages=[], extra_body={"stub": {"delay_s": 8}})
        assert e.value.status_code == 504 and 1.5 < time.monotonic() - started < 6
        with node_a.admin() as admin:
            assert b_key not in admin.get("/admin/v1/status").text
        assert b_key not in node_a.log.read_text()
        # Without the variable: held, saying which variable is missing.
        node_c = node_factory(a_toml, ready=False)
        assert wait_until(lambda: _answers(node_c.url), timeout=30)
        assert wait_until(lambda: any("NODE_B_KEY" in (w["last_error"] or "") for w in node_c.workers()), timeout=30)
    finally:
        stub.kill()
        stub.wait()


def test_url_credentials_go_as_basic_auth_never_in_the_host_header(node_factory):
    port = free_port()
    stub = openai_worker.start(port, "--model", "ext-model")
    try:
        node = node_factory(ext_toml(port).replace("http://127.0.0.1", "http://user%40x:s3cr%3At@127.0.0.1"))
        key = node.create_key()
        r = httpx.post(node.url + "/v1/chat/completions", json={"model": "ext-model", "messages": []},
                       headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200
        seen = [e for e in httpx.get(f"http://127.0.0.1:{port}/stub/events", timeout=5).json() if e["event"] == "request"]
        assert seen[-1]["host"] == f"127.0.0.1:{port}"
        assert seen[-1]["authorization"] == "Basic " + base64.b64encode(b"user@x:s3cr:t").decode()
    finally:
        stub.kill()
        stub.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
