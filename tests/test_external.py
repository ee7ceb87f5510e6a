"""`runtime = "external"`: a server the node does not launch, behind the node's keys, quotas, metrics and health."""

from __future__ import annotations

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
