"""The supervisor with real child processes: backoff, crash loop, start-up deadline,
inference probe (a misbehaving stand-in interpreter for llama.cpp), and with a real
node: reload restarts only what changed, SIGTERM drains, SIGUSR2 + `up` adopts the
running llama.cpp worker, a missing runtime is reported."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from node.config import SupervisorSection
from node.workers.keeper import process_start_time
from node.workers.replica import Replica
from node.workers.states import TRANSITIONS, WorkerState
from runtimes import WorkerSpec
from tests.conftest import REPO, TINY_MODEL, free_port, run_cli, start_node, wait_until, write_config

S = WorkerState
FAKE_SERVER = REPO / "tests" / "fakes" / "llama_server.py"


# -- one replica, driven directly ------------------------------------------------------
class Recorder:
    """Every state a replica enters, with the time, checked against the table."""

    def __init__(self) -> None:
        self.events: list[tuple[WorkerState, float, str]] = []
        self.pids: set[int] = set()
        self.prev = S.PENDING

    def __call__(self, r: Replica) -> None:
        assert r.state is self.prev or r.state in TRANSITIONS[self.prev], (self.prev, r.state)
        self.prev = r.state
        self.events.append((r.state, time.monotonic(), r.last_error))
        if r.keeper is not None:
            self.pids.add(r.keeper.pid)

    def states(self) -> list[WorkerState]:
        return [e[0] for e in self.events]

    def gaps(self) -> list[float]:
        """Seconds from each RESTARTING to the next STARTING (the backoff actually waited)."""
        out = []
        for (s1, t1, _), (s2, t2, _) in zip(self.events, self.events[1:]):
            if s1 is S.RESTARTING and s2 is S.STARTING:
                out.append(t2 - t1)
        return out


def make_replica(tmp: Path, mode: str, rec: Recorder, *, probe_inference: bool = False,
                 startup_timeout_s: float = 20, env: dict | None = None, **settings) -> Replica:
    base = dict(backoff_initial_s=0.2, backoff_max_s=0.8, stable_after_s=30, crash_loop_limit=5,
                probe_interval_s=0.2, probe_timeout_s=2, probe_failures=2, stop_timeout_s=3)
    spec = WorkerSpec(model="fake", replica=0, runtime="llamacpp", port=0, model_path=tmp / "model.gguf",
                      binary=str(FAKE_SERVER), env={"FAKE_LLAMACPP_MODE": mode, **(env or {})},
                      startup_timeout_s=startup_timeout_s)
    return Replica(spec=spec, settings=SupervisorSection(**{**base, **settings}), run_dir=tmp / "run",
                   log_dir=tmp / "logs", probe_client=httpx.AsyncClient(), on_change=rec,
                   adopt_grace_s=3, probe_inference=probe_inference)


def drive(replica: Replica, until, timeout: float = 60) -> None:
    """Run the replica's task until `until()` is true, then stop it (and its worker)."""
    async def main() -> None:
        replica.start()
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await replica.stop()
        await replica.probe_client.aclose()
    asyncio.run(main())


def test_crash_loop_backs_off_then_fails_with_log_lines(tmp_path):
    rec = Recorder()
    r = make_replica(tmp_path, "crash", rec)
    drive(r, lambda: rec.prev is S.FAILED)
    assert rec.prev is S.STOPPED
    failed = [e for e in rec.events if e[0] is S.FAILED]
    assert len(failed) == 1
    reason = failed[0][2]
    assert reason.startswith("crash loop: worker exited with code 3")
    assert "fatal: out of memory while allocating the KV cache" in reason  # the log's last lines
    assert "llama_model_load: loading model" in reason
    assert r.restarts == 5
    assert rec.states().count(S.STARTING) == 5
    # 0.2 s doubling, capped at 0.8 s: 0.2, 0.4, 0.8, 0.8 (each start takes some time itself).
    gaps = rec.gaps()
    assert len(gaps) == 4
    for got, want in zip(gaps, [0.2, 0.4, 0.8, 0.8]):
        assert want * 0.9 <= got <= want + 1.5, gaps
    assert gaps[2] > gaps[0] * 2
    assert (tmp_path / "logs" / "fake-0.log").exists()
    assert not any(process_start_time(pid) for pid in rec.pids)  # every keeper is gone


def test_backoff_resets_after_a_stable_run(tmp_path):
    rec = Recorder()
    # Each life is ready for 1 s, longer than stable_after_s: every crash starts a fresh count.
    r = make_replica(tmp_path, "crash_after:1.0", rec, stable_after_s=0.5, crash_loop_limit=2,
                     backoff_initial_s=0.3, backoff_max_s=5)
    drive(r, lambda: r.restarts >= 4, timeout=60)
    assert r.restarts >= 4
    assert S.FAILED not in rec.states()  # 4 crashes > crash_loop_limit, yet no crash loop
    gaps = rec.gaps()
    assert len(gaps) >= 3 and all(0.27 <= g < 1.0 for g in gaps), gaps  # never doubled to 0.6, 1.2, ...
    assert "segmentation fault" in (tmp_path / "logs" / "fake-0.log").read_text()


def test_recovers_after_early_crashes(tmp_path):
    rec = Recorder()
    r = make_replica(tmp_path, "crash_first:2", rec, env={"FAKE_LLAMACPP_COUNTER": str(tmp_path / "starts")})
    drive(r, lambda: rec.prev is S.READY)
    assert S.READY in rec.states() and S.FAILED not in rec.states()
    assert r.restarts == 2
    assert (tmp_path / "starts").read_text() == "3"


def test_startup_deadline_kills_a_hung_worker(tmp_path):
    rec = Recorder()
    r = make_replica(tmp_path, "hang", rec, startup_timeout_s=2, crash_loop_limit=1)
    pids: list[int] = []
    drive(r, lambda: (r.worker_pid and pids.append(r.worker_pid)) or rec.prev is S.FAILED, timeout=40)
    failed = [e for e in rec.events if e[0] is S.FAILED]
    assert failed and "not ready within 2s" in failed[0][2]
    assert "never finishes" in failed[0][2]
    starting = next(t for s, t, _ in rec.events if s is S.STARTING)
    assert failed[0][1] - starting >= 2
    assert pids and process_start_time(pids[0]) is None  # the hung worker was killed


def test_inference_probe_restarts_a_worker_that_cannot_infer(tmp_path):
    rec = Recorder()
    r = make_replica(tmp_path, "infer_fail", rec, probe_inference=True, inference_probe_every=2)
    drive(r, lambda: r.restarts >= 1, timeout=30)
    states = rec.states()
    assert states[:2] == [S.STARTING, S.READY]
    unhealthy = [e for e in rec.events if e[0] is S.UNHEALTHY]
    assert unhealthy and "inference probe: HTTP 500" in unhealthy[0][2]
    assert S.RESTARTING in states and r.restarts >= 1


def test_without_inference_probe_health_alone_passes(tmp_path):
    rec = Recorder()
    r = make_replica(tmp_path, "infer_fail", rec, probe_inference=False, inference_probe_every=2)
    ready_at: list[float] = []
    drive(r, lambda: (rec.prev is S.READY and not ready_at and ready_at.append(time.monotonic())) or
          (ready_at and time.monotonic() - ready_at[0] > 2.0), timeout=30)
    assert S.UNHEALTHY not in rec.states() and r.restarts == 0  # /v1/models is fine; nothing sent a completion


# -- a real node --------------------------------------------------------------------------
def two_models(b_args: str = '["-t", "1"]', a_args: str = '["-t", "1"]') -> str:
    return f"""
[[models]]
name = "a"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
args = {a_args}

[[models]]
name = "b"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
args = {b_args}
"""


def pids(node) -> dict[str, int]:
    return {w["id"]: w["pid"] for w in node.workers()}


def all_ready(node) -> bool:
    ws = node.workers()
    return bool(ws) and all(w["state"] == "ready" and w["pid"] for w in ws)


def test_reload_restarts_only_the_changed_model(node_factory):
    node = node_factory(two_models())
    port = node.url.rsplit(":", 1)[1]
    assert wait_until(lambda: all_ready(node), timeout=60)
    before = pids(node)
    write_config(node.config.parent, two_models(b_args='["-t", "1", "-b", "64"]'), port=int(port))
    with node.admin() as c:
        r = c.post("/admin/v1/reload")
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["started"] == ["b-0"] and summary["unchanged"] == ["a-0"] and summary["stopped"] == []
    assert wait_until(lambda: all_ready(node), timeout=60)
    after = pids(node)
    assert after["a-0"] == before["a-0"]
    assert after["b-0"] != before["b-0"]
    assert process_start_time(before["b-0"]) is None

    # SIGHUP does the same: change a, leave b.
    write_config(node.config.parent, two_models(b_args='["-t", "1", "-b", "64"]',
                                                a_args='["-t", "1", "-b", "32"]'), port=int(port))
    node.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: pids(node).get("a-0") not in (None, after["a-0"]) and all_ready(node), timeout=60)
    assert pids(node)["b-0"] == after["b-0"]
    assert "received SIGHUP" in node.log.read_text()
    # A broken config is refused with the reason, and everything keeps running.
    node.config.write_text(node.config.read_text() + "\n[supervisor]\nbogus = 1\n")
    with node.admin() as c:
        r = c.post("/admin/v1/reload")
    assert r.status_code >= 400 and "appliance.toml" in r.json()["error"]["message"]
    assert all_ready(node)


def test_sigusr2_then_up_adopts_the_running_worker(tmp_path):
    cfg = write_config(tmp_path, TINY_MODEL)
    # A loaded 2-core box can take seconds to start a node; the default grace is 30 s.
    cfg.write_text(cfg.read_text().replace("adopt_grace_s = 3", "adopt_grace_s = 20"))
    node = start_node(cfg)
    successor = None
    try:
        node.wait_ready(60)
        [w] = node.workers()
        key = node.create_key()
        assert node.stop(signal.SIGUSR2) == 0
        assert process_start_time(w["pid"]) is not None  # left running for the successor
        successor = start_node(cfg, lock=False)
        t0 = time.monotonic()
        successor.wait_ready(60)
        ready_s = time.monotonic() - t0
        [w2] = successor.workers()
        assert w2["pid"] == w["pid"] and w2["adopted"] is True and w2["restarts"] == 0, (w, w2)
        assert w2["port"] == w["port"]
        log_path = node.data_dir / "logs" / "tiny-chat-0.log"
        # The keeper notices its new owner on its next poll, which may come after the successor is ready.
        assert wait_until(lambda: f"adopted by node {successor.proc.pid}" in log_path.read_text(), timeout=15)
        assert log_path.read_text().count("[keeper] starting") == 1  # never restarted: no model reload
        r = httpx.post(successor.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200, r.text
        print(f"successor ready (worker adopted) {ready_s:.2f}s after start")
        assert successor.stop() == 0
        assert process_start_time(w["pid"]) is None  # the successor owns it: its SIGTERM stops it
    finally:
        node.stop()
        if successor is not None:
            successor.stop()


def test_sigterm_drains_inflight_stream_and_refuses_new(node_factory, tmp_path):
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_worker", "--port", str(stub_port),
                             "--model", "ext"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = node_factory(f'[[models]]\nname = "ext"\nruntime = "external"\nurl = "http://127.0.0.1:{stub_port}/v1"\n')
        key = node.create_key()
        headers = {"authorization": f"Bearer {key}"}
        got: list[str] = []
        first = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", node.url + "/v1/chat/completions", headers=headers, timeout=30,
                              json={"model": "ext", "messages": [{"role": "user", "content": "x"}], "stream": True,
                                    "stub": {"chunks": 10, "chunk_delay_s": 0.3}}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got.append(line)
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(15)
        node.proc.send_signal(signal.SIGTERM)
        refused = wait_until(lambda: _post(node.url, headers), timeout=5)
        assert refused is not None and refused.status_code == 503, refused and refused.text
        assert httpx.get(node.url + "/readyz", timeout=5).json()["reasons"] == ["the node is shutting down"]
        t.join(20)
        assert got[-1] == "data: [DONE]"
        assert len([g for g in got if '"content"' in g]) == 10  # every chunk arrived during the drain
        assert node.proc.wait(20) == 0
    finally:
        stub.terminate()
        stub.wait(10)


def _post(url: str, headers: dict):
    try:
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=5,
                       json={"model": "ext", "messages": [{"role": "user", "content": "x"}]})
    except httpx.HTTPError:
        return None
    return r if r.status_code == 503 else None


VLLM_MODEL = """
[[models]]
name = "tiny-chat"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
"""


@pytest.mark.parametrize("runtime,models,setting,missing,says", [
    ("llamacpp", TINY_MODEL, "server", "/nonexistent/bin/llama-server",
     "llamacpp is not installed: [runtimes.llamacpp] server = /nonexistent/bin/llama-server: not found"),
    ("vllm", VLLM_MODEL, "python", "/nonexistent/venv/bin/python",
     "vllm is not installed: /nonexistent/venv/bin/python not found"),
])
def test_missing_runtime_is_a_clear_failed_state(node_factory, runtime, models, setting, missing, says):
    node = node_factory(models, extra=f'[runtimes.{runtime}]\n{setting} = "{missing}"\n', ready=False)
    r = wait_until(lambda: _ready_reasons(node), timeout=30)
    assert r and says in r[0]
    [w] = node.workers()
    assert w["state"] == "failed" and f"{runtime} is not installed" in w["last_error"]
    out = run_cli("status", "--json", config=node.config, check=True)
    status = json.loads(out.stdout)
    assert status["workers"][0]["state"] == "failed"
    assert "is not installed" in status["workers"][0]["last_error"]
    assert status["node"]["ready"] is False
    doctor = run_cli("doctor", "--json", config=node.config)
    assert doctor.returncode != 0
    [check] = [c for c in json.loads(doctor.stdout) if c["name"] == f"runtime {runtime}"]
    assert check["level"] == "fail" and says in check["detail"]


def _ready_reasons(node) -> list[str] | None:
    try:
        r = httpx.get(node.url + "/readyz", timeout=2)
    except httpx.HTTPError:
        return None
    reasons = r.json().get("reasons", [])
    return reasons if r.status_code == 503 and any("not installed" in x for x in reasons) else None


# -- warm-up: Ollama's model is loaded and pinned before the replica is ready ----------
FAKE_OLLAMA = REPO / "tests" / "fakes" / "bin" / "ollama"


def ollama_tree(root: Path, with_blob: bool = True) -> Path:
    """An OLLAMA_MODELS tree holding `tiny:latest` (manifest, and its model blob unless told not)."""
    import hashlib

    blob = b"GGUF fake weights"
    digest = hashlib.sha256(blob).hexdigest()
    manifest = {"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(blob)}]}
    m = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    m.parent.mkdir(parents=True)
    m.write_text(json.dumps(manifest))
    (root / "blobs").mkdir()
    if with_blob:
        (root / "blobs" / f"sha256-{digest}").write_bytes(blob)
    return root


def ollama_replica(tmp: Path, rec: Recorder, *, with_blob: bool = True) -> Replica:
    spec = WorkerSpec(model="tiny", replica=0, runtime="ollama", port=0, source="ollama:tiny",
                      model_path=ollama_tree(tmp / "ollama", with_blob), binary=str(FAKE_OLLAMA),
                      env={"FAKE_RUNTIME_LOAD_DELAY_S": "1.0"}, startup_timeout_s=20)
    settings = SupervisorSection(backoff_initial_s=0.2, crash_loop_limit=1, probe_interval_s=0.2, stop_timeout_s=3)
    return Replica(spec=spec, settings=settings, run_dir=tmp / "run", log_dir=tmp / "logs",
                   probe_client=httpx.AsyncClient(), on_change=rec, adopt_grace_s=3)


def test_ollama_warmup_loads_and_pins_before_ready(tmp_path):
    rec = Recorder()
    r = ollama_replica(tmp_path, rec)
    loaded: list[dict] = []

    def ready_and_checked() -> bool:
        if rec.prev is not S.READY or loaded:
            return bool(loaded)
        loaded.extend(httpx.get(r.plan.root_url + "/api/ps", timeout=5).json()["models"])
        return True

    drive(r, ready_and_checked, timeout=30)
    [m] = loaded
    assert m["name"] == "tiny:latest" and m["expires_at"].startswith("2318-")  # keep_alive=-1: forever
    times = {s: t for s, t, _ in rec.events}
    assert times[S.READY] - times[S.STARTING] >= 1.0  # the 1 s model load happened before READY


def test_ollama_warmup_failure_is_reported(tmp_path):
    rec = Recorder()
    r = ollama_replica(tmp_path, rec, with_blob=False)
    drive(r, lambda: rec.prev is S.FAILED, timeout=30)
    [failed] = [e for e in rec.events if e[0] is S.FAILED]
    assert "warm-up /api/generate: HTTP" in failed[2] and "has no model blob" in failed[2]
    assert S.READY not in rec.states()
