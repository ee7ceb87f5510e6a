"""Models on demand with real llama.cpp workers through a real `infernode up`: loads on
first request (one load for many waiters), swaps under max_loaded_models with zero
errors, unloads when idle, never evicts an `always` model, refuses with 503
model_not_ready when nothing can make room, load/unload through the admin API and the
CLI, and adoption of a loaded on-demand model across a node restart."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.workers.keeper import process_start_time
from tests.conftest import NodeProc, run_cli, start_node, wait_until, write_config


def model(name: str, *, load: str = "on_demand", extra: str = "") -> str:
    return f"""
[[models]]
name = "{name}"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
args = ["-t", "1"]
load = "{load}"
{extra}
"""


def with_node_keys(cfg_text: str, **keys) -> str:
    """The test config with extra [node] keys (write_config writes the [node] table)."""
    lines = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return cfg_text.replace('drain_grace_s = 5\n', 'drain_grace_s = 5\n' + lines, 1)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator:
    """Start nodes with extra [node] keys; each is stopped at the end."""
    started: list[NodeProc] = []

    def make(models: str, **node_keys) -> NodeProc:
        d = tmp_path / f"node{len(started)}"
        d.mkdir()
        cfg = write_config(d, models)
        cfg.write_text(with_node_keys(cfg.read_text(), **node_keys))
        n = start_node(cfg)
        started.append(n)
        n.wait_ready(90)
        return n

    yield make
    for n in started:
        n.stop()


def states(node) -> dict[str, str]:
    return {w["model"]: w["state"] for w in node.workers()}


def metric(node, name: str, **labels) -> float:
    text = httpx.get(node.url + "/metrics", timeout=10).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def chat(node, key: str, name: str, *, stream: bool = False, timeout: float = 120) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    return httpx.post(node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json=body,
                      timeout=timeout)


def test_alternating_requests_swap_with_zero_errors(nodes):
    node = nodes(model("a") + model("b"), max_loaded_models=1)
    # On-demand models count as ready before any load; nothing is loaded yet.
    assert httpx.get(node.url + "/readyz").status_code == 200
    assert states(node) == {"a": "unloaded", "b": "unloaded"}
    key = node.create_key()
    c = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, timeout=120)
    statuses = []
    for i, name in enumerate(["a", "b", "a", "b", "a", "b"]):
        if i % 2:  # streams too: the first byte comes once the model is ready
            chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            statuses.append(200)
        else:
            statuses.append(chat(node, key, name).status_code)
        st = states(node)
        other = "b" if name == "a" else "a"
        assert st[name] == "ready" and st[other] == "unloaded", st
    assert statuses == [200] * 6
    assert metric(node, "infernode_model_loads_total", model="a", reason="request") == 3
    assert metric(node, "infernode_model_loads_total", model="b", reason="request") == 3
    assert metric(node, "infernode_model_evictions_total", model="a") == 3
    assert metric(node, "infernode_model_evictions_total", model="b") == 2
    assert metric(node, "infernode_model_load_seconds_count", model="a") == 3
    assert metric(node, "infernode_model_loaded", model="b") == 1
    assert metric(node, "infernode_model_loaded", model="a") == 0
    # Only one worker process runs at any time.
    assert len([w for w in node.workers() if w["pid"]]) == 1


def test_concurrent_requests_to_an_unloaded_model_cause_one_load(nodes):
    node = nodes(model("a") + model("b"), max_loaded_models=1)
    key = node.create_key()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            rs = await asyncio.gather(*(client.post(node.url + "/v1/chat/completions", json=body,
                                                    headers={"authorization": f"Bearer {key}"}) for _ in range(8)))
            return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 8
    assert metric(node, "infernode_model_loads_total", model="a") == 1
    assert metric(node, "infernode_model_load_seconds_count", model="a") == 1
    log = (node.data_dir / "logs" / "a-0.log").read_text()
    assert log.count("[keeper] starting") == 1

    # A client that gives up cancels nothing but its own request: the load goes on.
    with httpx.Client(timeout=0.3) as impatient:
        try:
            impatient.post(node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                           json={"model": "b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        except httpx.TimeoutException:
            pass
    assert wait_until(lambda: states(node)["b"] == "ready", timeout=60)
    assert chat(node, key, "b").status_code == 200
    assert metric(node, "infernode_model_loads_total", model="b") == 1


def test_idle_unload_and_admin_cli_load_unload(nodes):
    node = nodes(model("a", extra="idle_unload_s = 2") + model("b", extra="idle_unload_s = 0"))
    key = node.create_key()
    assert chat(node, key, "a").status_code == 200
    [w] = [w for w in node.workers() if w["model"] == "a"]
    assert w["state"] == "ready" and w["pid"]
    assert wait_until(lambda: states(node)["a"] == "unloaded", timeout=30)
    assert wait_until(lambda: process_start_time(w["pid"]) is None, timeout=10)
    assert next(x for x in node.workers() if x["model"] == "a")["last_error"] == ""  # idleness is no error

    # The CLI (through the admin API): load, then unload; idle_unload_s = 0 never unloads by itself.
    p = run_cli("load", "b", config=node.config, check=True)
    assert "b ready" in p.stdout
    assert states(node)["b"] == "ready"
    time.sleep(3)
    assert states(node)["b"] == "ready"
    assert metric(node, "infernode_model_loads_total", model="b", reason="admin") == 1
    p = run_cli("status", config=node.config, check=True, env={"COLUMNS": "200"})
    assert " unloaded " in p.stdout and " ready " in p.stdout
    p = run_cli("unload", "b", config=node.config, check=True)
    assert "b unloaded (1 replica(s) were up)" in p.stdout
    assert states(node)["b"] == "unloaded"

    with node.admin() as admin:
        r = admin.post("/admin/v1/models/a/load")
        assert r.status_code == 200 and r.json()["state"] == "ready" and r.json()["seconds"] > 0
        r = admin.post("/admin/v1/models/a/load")  # idempotent: already ready
        assert r.status_code == 200
        assert admin.post("/admin/v1/models/a/unload").json() == {"model": "a", "state": "unloaded", "unloaded": 1}
        assert admin.post("/admin/v1/models/a/unload").json()["unloaded"] == 0
        # Bad input: unknown names (odd, huge), the wrong method, no key.
        for name in ("nope", "x" * 5000, "%00", "a%20"):
            for action in ("load", "unload"):
                r = admin.post(f"/admin/v1/models/{name}/{action}")
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (name, r.text)
        assert admin.post("/admin/v1/models/..%2F..%2Fa/load").status_code == 404  # matches no route at all
        assert admin.get("/admin/v1/models/a/load").status_code == 405
    assert httpx.post(node.url + "/admin/v1/models/a/load").status_code == 401
    p = run_cli("load", "nope", config=node.config)
    assert p.returncode == 1 and "no model named 'nope'" in p.stderr


def test_always_model_is_never_evicted_and_503_when_nothing_can_make_room(nodes):
    node = nodes(model("c", load="always") + model("a") + model("b"), max_loaded_models=2)
    key = node.create_key()
    [c0] = [w for w in node.workers() if w["model"] == "c"]
    for name in ["a", "b", "a", "b"]:
        assert chat(node, key, name).status_code == 200
    [c1] = [w for w in node.workers() if w["model"] == "c"]
    assert c1["state"] == "ready" and c1["pid"] == c0["pid"]
    assert metric(node, "infernode_model_evictions_total", model="c") == 0
    assert metric(node, "infernode_model_evictions_total", model="a") == 2
    with node.admin() as admin:
        r = admin.post("/admin/v1/models/c/unload")
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_always_loaded"

    # With room for one model only, the always model holds it: an on-demand load is refused.
    node.stop()
    node.config.write_text(node.config.read_text().replace("max_loaded_models = 2", "max_loaded_models = 1"))
    again = start_node(node.config, lock=False)
    node.proc, node.log = again.proc, again.log
    node.wait_ready(90)
    r = chat(node, key, "a")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_ready" and err["type"]
    assert "max_loaded_models = 1" in err["message"] and "c" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert states(node)["a"] == "unloaded"


def test_loaded_on_demand_model_is_adopted_across_restart_and_keeps_its_idle_timer(tmp_path):
    cfg = write_config(tmp_path, model("a", extra="idle_unload_s = 6"))
    cfg.write_text(cfg.read_text().replace("adopt_grace_s = 3", "adopt_grace_s = 20"))
    node = start_node(cfg)
    successor = None
    try:
        node.wait_ready(60)
        key = node.create_key()
        assert chat(node, key, "a").status_code == 200
        [w] = node.workers()
        assert w["state"] == "ready"
        assert node.stop(signal.SIGUSR2) == 0
        assert process_start_time(w["pid"]) is not None
        successor = start_node(cfg, lock=False)
        successor.wait_ready(60)
        assert wait_until(lambda: successor.workers()[0]["state"] == "ready", timeout=30)
        [w2] = successor.workers()
        assert w2["pid"] == w["pid"] and w2["adopted"] is True and w2["load"] == "on_demand"
        assert chat(successor, key, "a").status_code == 200
        assert metric(successor, "infernode_model_loads_total", model="a") == 0  # adopted, not loaded
        # The idle timer runs on the adopted worker too.
        assert wait_until(lambda: successor.workers()[0]["state"] == "unloaded", timeout=40)
        assert wait_until(lambda: process_start_time(w["pid"]) is None, timeout=10)
        assert successor.stop() == 0
    finally:
        node.stop()
        if successor is not None:
            successor.stop()


FAKE_PYTHON = Path(__file__).resolve().parent / "fakes" / "bin" / "python"


def test_vllm_sleep_mode_idles_asleep_and_wakes_the_same_process(nodes):
    """The vLLM stand-in (sleep routes as vLLM 0.32 serves them): idle -> /sleep?level=1, request -> /wake_up."""
    vllm = f"""
[[models]]
name = "v"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
load = "on_demand"
sleep = true
idle_unload_s = 2

[runtimes.vllm]
python = "{FAKE_PYTHON}"
"""
    node = nodes(vllm)
    key = node.create_key()
    assert chat(node, key, "v").status_code == 200
    [w] = node.workers()
    assert w["state"] == "ready" and w["pid"]
    assert wait_until(lambda: node.workers()[0]["state"] == "unloaded", timeout=30)
    [asleep] = node.workers()
    assert asleep["sleeping"] is True and asleep["pid"] == w["pid"] and process_start_time(w["pid"]) is not None
    log = node.data_dir / "logs" / "v-0.log"
    assert "--enable-sleep-mode" in log.read_text() and "POST /sleep?level=1" in log.read_text()
    # A request wakes it: the same process, no second start.
    r = chat(node, key, "v", stream=True)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    [awake] = node.workers()
    assert awake["state"] == "ready" and awake["sleeping"] is False and awake["pid"] == w["pid"]
    text = log.read_text()
    assert text.count("[keeper] starting") == 1 and "POST /wake_up" in text
    assert metric(node, "infernode_model_loads_total", model="v", reason="request") == 2
    # An operator's unload puts it to sleep too; stopping the node stops the sleeper.
    with node.admin() as admin:
        assert admin.post("/admin/v1/models/v/unload").json()["unloaded"] == 1
    assert node.workers()[0]["sleeping"] is True
    assert node.stop() == 0
    assert process_start_time(w["pid"]) is None


def test_sleep_mode_refused_on_cpu_is_a_failed_load_with_the_reason(nodes):
    vllm = f"""
[[models]]
name = "v"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
load = "on_demand"
sleep = true
env = {{ FAKE_VLLM_PLATFORM = "cpu" }}

[runtimes.vllm]
python = "{FAKE_PYTHON}"
"""
    node = nodes(vllm)
    key = node.create_key()
    r = chat(node, key, "v")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    assert "Sleep mode is not supported on current platform" in r.json()["error"]["message"]
    # Each request retries the load; after crash_loop_limit (4 here) failures in a row the model is
    # failed: requests are refused at once, /readyz says so, and an operator's `load` retries it.
    for _ in range(3):
        assert chat(node, key, "v").status_code == 503
    assert wait_until(lambda: node.workers()[0]["state"] == "failed", timeout=30)
    r = chat(node, key, "v")
    assert r.status_code == 503 and "infernode load v" in r.json()["error"]["message"]
    ready = httpx.get(node.url + "/readyz")
    assert ready.status_code == 503 and "v: replica 0 failed: 4 loads failed in a row" in ready.text
    with node.admin() as admin:
        r = admin.post("/admin/v1/models/v/load")
    assert r.status_code == 503 and "Sleep mode is not supported" in r.json()["error"]["message"]
