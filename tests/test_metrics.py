"""Metrics: the families docs/ops/metrics.md lists, promtool-valid, NVML and worker metrics sampled in the background."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.ops.metrics import Metrics, RequestWindow, relabel
from node.ops.sampler import Sampler
from node.workers.gpus import discover
from node.workers.states import WorkerState
from tests.conftest import run_cli, wait_until
from tests.fakes.nvml import FakeGpu, FakeNvml

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")

# The shape of vLLM's /metrics (docs.vllm.ai "Production Metrics"): colon names, model_name label.
VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="qwen"} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="qwen"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="qwen"} 1234.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{model_name="qwen"} 1.7e9
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="qwen"} 3.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="qwen"} 4.0
vllm:time_to_first_token_seconds_count{model_name="qwen"} 4.0
vllm:time_to_first_token_seconds_sum{model_name="qwen"} 0.9
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.5e9
"""


def promtool(text: str) -> tuple[int, str]:
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def fake_box() -> FakeNvml:
    return FakeNvml.with_gpus(
        FakeGpu("NVIDIA A100-SXM4-80GB", 80, used_gib=20, utilization_pct=37, temperature_c=66, power_mw=250_500),
        FakeGpu("NVIDIA L4", 24, used_gib=1, utilization_pct=0, temperature_c=41, power_mw=16_000),
    )


def test_gpu_families_from_nvml_sample():
    m = Metrics()
    inv = discover(fake_box())
    m.set_gpus(inv)
    text = m.render().decode()
    uuid0 = inv.gpus[0].uuid
    assert value(text, "infernode_gpu_memory_used_bytes", gpu="0", uuid=uuid0) == 20 * 2**30
    assert value(text, "infernode_gpu_memory_total_bytes", gpu="0", uuid=uuid0) == 80 * 2**30
    assert value(text, "infernode_gpu_utilization_ratio", gpu="0", uuid=uuid0) == pytest.approx(0.37)
    assert value(text, "infernode_gpu_temperature_celsius", gpu="0", uuid=uuid0) == 66
    assert value(text, "infernode_gpu_power_watts", gpu="0", uuid=uuid0) == pytest.approx(250.5)
    assert value(text, "infernode_gpu_temperature_celsius", gpu="1", uuid=inv.gpus[1].uuid) == 41
    # A GPU that disappears leaves no stale series behind.
    m.set_gpus(discover(FakeNvml.with_gpus(FakeGpu("NVIDIA L4", 24, uuid="GPU-other"))))
    text = m.render().decode()
    assert value(text, "infernode_gpu_memory_total_bytes", gpu="0", uuid=uuid0) is None
    assert len([k for k in samples(text) if k[0] == "infernode_gpu_memory_total_bytes"]) == 1


@needs_promtool
def test_node_exposition_passes_promtool_cleanly():
    m = Metrics()
    m.set_gpus(discover(fake_box()))
    m.requests.labels("tiny", "200").inc(3)
    m.duration.labels("tiny").observe(0.2)
    m.ttft.labels("tiny").observe(0.05)
    m.tokens.labels("tiny", "prompt").inc(10)
    m.quota_rejections.labels("key_rpm").inc()
    m.worker_up.labels("tiny", "0", "llamacpp").set(1)
    m.worker_restarts.labels("tiny", "0").inc()
    rc, out = promtool(m.render().decode())
    assert rc == 0, out


def test_worker_metrics_relabelled_and_merged():
    fams = {f.name: f for f in relabel(VLLM_METRICS, "qwen", "1")}
    assert "vllm:prompt_tokens_created" in fams  # typed gauge: kept as the worker wrote it
    s = fams["vllm:num_requests_running"].samples[0]
    assert s.labels == {"model_name": "qwen", "model": "qwen", "replica": "1"}
    clash = relabel('# TYPE x gauge\nx{model="inner",replica="a"} 1\n', "outer", "0")[0].samples[0]
    assert clash.labels == {"exported_model": "inner", "exported_replica": "a", "model": "outer", "replica": "0"}

    m = Metrics()
    m.set_worker_metrics("qwen", "0", VLLM_METRICS)
    m.set_worker_metrics("qwen", "1", VLLM_METRICS.replace("1234.0", "99.0"))
    text = m.render().decode()
    assert value(text, "vllm:prompt_tokens_total", model="qwen", replica="0", model_name="qwen") == 1234
    assert value(text, "vllm:prompt_tokens_total", model="qwen", replica="1", model_name="qwen") == 99
    assert value(text, "infernode_worker_metrics_up", model="qwen", replica="1") == 1
    # One block per family: the node's own process metrics and the workers' share one TYPE line.
    assert text.count("# TYPE process_resident_memory_bytes ") == 1
    assert value(text, "process_resident_memory_bytes", model="qwen", replica="0") == 1.5e9
    assert ("process_resident_memory_bytes", frozenset()) in samples(text)
    m.drop_worker_metrics("qwen", "1", failed=True)
    text = m.render().decode()
    assert value(text, "vllm:prompt_tokens_total", model="qwen", replica="1", model_name="qwen") is None
    assert value(text, "infernode_worker_metrics_up", model="qwen", replica="1") == 0


@needs_promtool
def test_merged_exposition_is_valid_for_promtool():
    m = Metrics()
    m.set_worker_metrics("qwen", "0", VLLM_METRICS)
    m.set_worker_metrics("qwen", "1", VLLM_METRICS)
    rc, out = promtool(m.render().decode())
    # vLLM's own names use ':' (a lint, not an error); anything else would be ours.
    problems = [line for line in out.splitlines() if line.strip()]
    assert rc in (0, 3), out
    assert problems and all("should not contain ':'" in p for p in problems), out


def test_request_window_counts_last_minute():
    w = RequestWindow(span_s=60)
    assert w.traffic().requests == 0
    for t in range(0, 100):
        w.record(1000.0 + t, requests=t * 2, errors=t // 10, rejected=0)
    tr = w.traffic()
    assert tr.window_s == 60 and tr.requests == 120 and tr.requests_per_s == 2.0
    assert tr.errors == 6 and tr.error_rate == pytest.approx(0.05)


class _WorkerMetrics(BaseHTTPRequestHandler):
    body = VLLM_METRICS.encode()
    hits = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits += 1
        if self.path != "/metrics":
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "text/plain; version=0.0.4")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *a) -> None:
        pass


def test_sampler_runs_in_background_and_scrape_only_renders():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WorkerMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}"
    nvml = fake_box()
    reads = []

    def read_gpus():
        reads.append(time.monotonic())
        return discover(nvml)

    def replica(n: int, state: WorkerState, path: str | None):
        return SimpleNamespace(spec=SimpleNamespace(model="qwen", replica=n), state=state,
                               plan=SimpleNamespace(root_url=root, metrics_path=path))

    replicas = [replica(0, WorkerState.READY, "/metrics"), replica(1, WorkerState.STARTING, "/metrics"),
                replica(2, WorkerState.READY, None), replica(3, WorkerState.READY, "/missing")]
    m = Metrics()
    hot = []

    async def main() -> str:
        async with httpx.AsyncClient() as client:
            s = Sampler(m, read_gpus=read_gpus, replicas=lambda: replicas, client=client, on_gpus=hot.append,
                        gpu_interval_s=0.2, window_interval_s=0.05, scrape_interval_s=0.2)
            s.start()
            await asyncio.sleep(0.7)
            before = len(reads)
            text = m.render().decode()  # a scrape: no NVML read, no worker request
            assert len(reads) == before
            m.requests.labels("qwen", "200").inc(5)
            await asyncio.sleep(0.2)
            assert s.window.traffic().requests == 5
            await s.stop()
            assert s.gpus is not None and len(s.gpus.gpus) == 2
            return text

    try:
        text = asyncio.run(main())
    finally:
        server.shutdown()
    assert 3 <= len(reads) <= 6  # fixed interval: 0, 0.2, 0.4, 0.6 (and maybe 0.8) s
    assert len(hot) == len(reads)
    assert value(text, "infernode_gpu_power_watts", gpu="1", uuid=discover(nvml).gpus[1].uuid) == 16
    assert value(text, "vllm:gpu_cache_usage_perc", model="qwen", replica="0", model_name="qwen") == 0.25
    assert value(text, "infernode_worker_metrics_up", model="qwen", replica="0") == 1
    assert value(text, "infernode_worker_metrics_up", model="qwen", replica="3") == 0   # 404: marked down
    assert not any(k[0].startswith("vllm:") and ("replica", "1") in k[1] for k in samples(text))  # not ready: not scraped
    assert not any(("replica", "2") in k[1] for k in samples(text))  # no metrics path: nothing


@needs_promtool
def test_metrics_after_known_traffic(tiny_node):
    key = tiny_node.create_key()
    h = {"authorization": f"Bearer {key}"}
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.Client(base_url=tiny_node.url, timeout=60) as c:
        for _ in range(2):
            assert c.post("/v1/chat/completions", headers=h, json=body).status_code == 200
        with c.stream("POST", "/v1/chat/completions", headers=h, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            r.read()
        assert c.post("/v1/chat/completions", headers={"authorization": "Bearer sk-wrong"}, json=body).status_code == 401
        text = c.get("/metrics").text
    rc, out = promtool(text)
    assert rc == 0, out
    assert value(text, "infernode_requests_total", model="tiny-chat", code="200") == 3
    assert value(text, "infernode_request_duration_seconds_count", model="tiny-chat") == 3
    assert value(text, "infernode_time_to_first_token_seconds_count", model="tiny-chat") == 1
    assert value(text, "infernode_tokens_total", model="tiny-chat", kind="completion") == 12  # 4 + 4 + 4 streamed
    assert value(text, "infernode_tokens_total", model="tiny-chat", kind="prompt") > 0
    assert value(text, "infernode_inflight_requests", model="tiny-chat") == 0
    assert value(text, "infernode_worker_up", model="tiny-chat", replica="0", runtime="llamacpp") == 1
    assert value(text, "infernode_build_info", version=__import__("node").__version__) == 1
    assert value(text, "process_resident_memory_bytes") > 0
    assert "key_id" not in text and key not in text  # no per-key labels
    # The 60 s window behind `infernode status` saw the same three answers.
    with tiny_node.admin() as c:
        traffic = wait_until(lambda: (t := c.get("/admin/v1/status").json()["traffic"])["requests"] >= 3 and t, timeout=5)
    assert traffic["requests"] == 3 and traffic["errors"] == 0 and traffic["requests_per_s"] > 0
    out = run_cli("status", config=tiny_node.config, env={"INFERNODE_ADMIN_KEY": tiny_node.admin_key, "COLUMNS": "160"},
                  check=True).stdout
    assert "test-node ready" in out and "3 requests, 0.0% errors (0 5xx), 0 rejected by quotas" in out
    assert re.search(r"tiny-chat\s+│\s+0\s+│\s+llamacpp\s+│\s+ready", out), out


def test_status_draws_gpu_memory_bars():
    from node.cli.ops import _bar

    assert _bar(0.5, 10) == "[green]█████[/][dim]░░░░░[/]"
    assert _bar(0.95, 10).startswith("[red]") and _bar(1.7, 4) == "[red]████[/][dim][/]"


VLLM_STAND_IN = f"""
[[models]]
name = "tiny-vllm"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
replicas = 2

[runtimes.vllm]
python = "{Path(__file__).resolve().parent / 'fakes' / 'bin' / 'python'}"
"""


def test_workers_own_metrics_reexposed_through_the_node(node_factory):
    """vLLM's /metrics (the stand-in's) appears on the node's one scrape target, per replica."""
    node = node_factory(VLLM_STAND_IN)

    def scraped() -> str | None:
        text = httpx.get(node.url + "/metrics", timeout=10).text
        reps = {r for r in ("0", "1")
                if value(text, "vllm:num_requests_running", model="tiny-vllm", replica=r, model_name="tiny-vllm") == 0}
        return text if reps == {"0", "1"} else None

    text = wait_until(scraped, timeout=30, interval=0.5)  # the sampler scrapes workers every 10 s
    assert text, httpx.get(node.url + "/metrics", timeout=10).text[-2000:]
    assert value(text, "infernode_worker_metrics_up", model="tiny-vllm", replica="1") == 1
    assert text.count("# TYPE vllm:num_requests_running ") == 1
    if PROMTOOL:
        rc, out = promtool(text)
        assert rc in (0, 3) and all("should not contain ':'" in p for p in out.splitlines() if p.strip()), out


def test_totals_count_each_request_once():
    m = Metrics()
    m.requests.labels("a", "200").inc(7)
    m.requests.labels("a", "502").inc(1)
    m.requests.labels("a", "429").inc(2)           # refused for model capacity: answered and counted...
    m.quota_rejections.labels("model_capacity").inc(2)  # ...and also a rejection
    m.quota_rejections.labels("key_rpm").inc(3)    # refused at admission: only a rejection
    assert m.totals() == (13, 1, 5)
