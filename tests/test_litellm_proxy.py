"""A real LiteLLM proxy (no database) in front of two real nodes, configured from `infernode fleet config`.

Needs `.venv-litellm` (made by `.ci/setup-litellm.sh`); skipped with that reason when absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, TINY_MODEL, free_port, run_cli, start_node, write_config

LITELLM = REPO / ".venv-litellm" / "bin" / "litellm"
PROXY_KEY = "sk-proxy-master"
# The tiny model's random weights may pick end-of-turn (token 2) first; forbid it so every
# answer has content.
NO_EOS = {"2": -100}

pytestmark = pytest.mark.skipif(not LITELLM.exists(),
                                reason="no LiteLLM proxy: run `bash .ci/setup-litellm.sh` to create .venv-litellm")


def _node(tmp_path: Path, name: str, started: list):
    d = tmp_path / name
    d.mkdir()
    port = free_port()
    # The proxy URL is never called here (register_on_start = false): this proxy has no database.
    cfg = write_config(d, TINY_MODEL, port=port, extra=f"""
[fleet.litellm]
url = "http://127.0.0.1:9"
advertise_url = "http://127.0.0.1:{port}"
register_on_start = false
""")
    n = start_node(cfg)
    started.append(n)
    return n


def _fleet_key_usage(n) -> dict:
    key_id = json.loads((n.data_dir / "fleet.key").read_text())["id"]
    with n.admin() as c:
        rows = c.get("/admin/v1/usage", params={"group_by": "key", "key": key_id}).json()["data"]
    return rows[0] if rows else {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two ready nodes and a LiteLLM proxy whose model_list is their `fleet config` output.

    Shared by the module's tests (starting three servers costs most of the time); the
    test that stops a node runs last.
    """
    tmp_path = tmp_path_factory.mktemp("litellm-fleet")
    nodes: list = []
    proxy = None
    try:
        a, b = _node(tmp_path, "a", nodes), _node(tmp_path, "b", nodes)
        a.wait_ready()
        b.wait_ready()
        model_list = []
        for n in (a, b):
            out = run_cli("fleet", "config", config=n.config, check=True).stdout
            model_list += yaml.safe_load(out)["model_list"]
        port = free_port()
        cfg = tmp_path / "litellm.yaml"
        cfg.write_text(yaml.safe_dump({
            "model_list": model_list,
            "general_settings": {"master_key": PROXY_KEY},
            "litellm_settings": {"num_retries": 3, "request_timeout": 60},
            "router_settings": {"num_retries": 3, "allowed_fails": 0, "cooldown_time": 30, "retry_after": 0},
        }))
        log = (tmp_path / "litellm.log").open("wb")
        proxy = subprocess.Popen([str(LITELLM), "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1"],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                 env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proxy.poll() is None, (tmp_path / "litellm.log").read_text()[-4000:]
            try:
                if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "litellm.log").read_text()[-4000:]
            time.sleep(0.5)
        yield url, a, b
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(20)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        for n in nodes:
            n.stop()


def _chat(url: str, **extra) -> httpx.Response:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "logit_bias": NO_EOS, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {PROXY_KEY}"},
                      timeout=120)


def test_proxy_routes_chat_streams_and_usage_to_both_nodes(fleet):
    url, a, b = fleet
    r = _chat(url)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0

    with httpx.stream("POST", url + "/v1/chat/completions", headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=120,
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
                            "logit_bias": NO_EOS, "stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks), json.dumps(chunks)
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] > 0

    for _ in range(10):
        assert _chat(url).status_code == 200
    ua, ub = _fleet_key_usage(a), _fleet_key_usage(b)
    # 12 requests, each accounted once on the node that served it, under the fleet key.
    assert ua["requests"] + ub["requests"] == 12, (ua, ub)
    assert ua["requests"] > 0 and ub["requests"] > 0, "the proxy sent everything to one node"
    assert ua["completion_tokens"] > 0 and ub["completion_tokens"] > 0


def test_traffic_moves_to_the_other_node_when_one_stops(fleet):
    url, a, b = fleet
    assert _chat(url).status_code == 200
    before = _fleet_key_usage(b)["requests"]
    assert a.stop() == 0
    codes = [_chat(url).status_code for _ in range(6)]
    assert codes == [200] * 6
    assert _fleet_key_usage(b)["requests"] - before == 6
