"""Runtime adapters: their argv, env and probes, and each stand-in launched by that real argv."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import runtimes
from node.workers import probes
from node.workers.gpus import discover
from runtimes import LaunchPlan, ModelLayout, Probe, Warmup, WorkerSpec, flag_value
from runtimes import ollama as ollama_rt
from runtimes import sglang as sglang_rt
from runtimes import vllm as vllm_rt
from tests.conftest import REPO, free_port

FAKES = REPO / "tests" / "fakes"
FAKE_PYTHON = str(FAKES / "bin" / "python")
FAKE_OLLAMA = str(FAKES / "bin" / "ollama")
HF_MODEL = REPO / "node" / "builtin_models" / "tiny-chat" / "hf"
UUIDS = ("GPU-00000000-1111-2222-3333-000000000000", "GPU-00000001-1111-2222-3333-000000000001")


def spec(runtime: str, **kw: object) -> WorkerSpec:
    base: dict[str, object] = {"model": "chat", "replica": 0, "runtime": runtime, "port": 8001, "model_path": HF_MODEL,
                               "python": "/opt/rt/bin/python"}
    return WorkerSpec(**{**base, **kw})  # type: ignore[arg-type]


# -- argv, env and probes ----------------------------------------------------------

def test_every_runtime_name_has_an_adapter() -> None:
    for name in runtimes.NAMES:
        assert runtimes.get(name).NAME == name
    layouts = {name: runtimes.get(name).LAYOUT for name in runtimes.NAMES}
    assert layouts == {"vllm": ModelLayout.HF_FOLDER, "sglang": ModelLayout.HF_FOLDER, "ollama": ModelLayout.OLLAMA_TREE,
                       "llamacpp": ModelLayout.GGUF_FILE, "external": None}
    assert [n for n in runtimes.NAMES if not runtimes.launched(n)] == ["external"]


def test_what_each_plan_tells_the_node() -> None:
    """Context length, request-id policy and stream usage come from the plan, never from the runtime's name."""
    from runtimes import llamacpp as llamacpp_rt

    gguf = HF_MODEL.parent / "model.gguf"
    lc = llamacpp_rt.plan(spec("llamacpp", model_path=gguf))
    # llama-server sends its own usage chunk and takes any request id.
    assert lc.context_length == 2048 and not lc.uuid_request_ids and lc.stream_usage
    # The node sizes -c as context x slots: each of the 4 slots holds the whole context.
    assert flag(lc.argv, "-c") == "8192" and flag(lc.argv, "-np") == "4" and "--no-kv-unified" in lc.argv
    assert llamacpp_rt.plan(spec("llamacpp", model_path=gguf, max_model_len=4096)).context_length == 4096
    assert flag(llamacpp_rt.plan(spec("llamacpp", model_path=gguf, max_model_len=4096)).argv, "-c") == "16384"
    # The user's -c is the whole cache: without the shared pool each of the slots holds an equal part of it.
    assert llamacpp_rt.plan(spec("llamacpp", model_path=gguf, args=("-c", "2048"))).context_length == 512
    assert llamacpp_rt.plan(spec("llamacpp", model_path=gguf, args=("--ctx-size=512", "-np", "1"))).context_length == 512
    split = llamacpp_rt.plan(spec("llamacpp", model_path=gguf, args=("-c", "4096", "-np", "2")))
    assert split.context_length == 2048 and split.concurrency == 2
    # With the shared pool (the user's choice) any one request may use all of it.
    shared = llamacpp_rt.plan(spec("llamacpp", model_path=gguf, args=("-c", "4096", "-np", "2", "--kv-unified")))
    assert shared.context_length == 4096 and "--no-kv-unified" not in shared.argv
    v = vllm_rt.plan(spec("vllm", args=("--max-model-len", "1024")))
    assert v.context_length == 1024 and not v.uuid_request_ids and v.stream_usage
    assert vllm_rt.plan(spec("vllm")).context_length is None  # vLLM reads it from the model
    assert sglang_rt.plan(spec("sglang", max_model_len=8192)).context_length == 8192
    assert runtimes.get("external").plan(spec("external", url="http://h:1/v1")).context_length is None


def test_ollama_private_registry_keeps_its_host_in_the_name(tmp_path: Path) -> None:
    p = ollama_rt.plan(spec("ollama", model="tiny", source="ollama:tiny:q4", registry="http://127.0.0.1:5000/",
                            model_path=tmp_path))
    assert p.upstream_model == "127.0.0.1:5000/library/tiny:q4" and p.ready.expect_model == p.upstream_model
    assert ollama_rt.with_registry("ollama:org/m", "https://reg.example") == "ollama:reg.example/org/m:latest"
    assert ollama_rt.with_registry("ollama:m:1", None) == "ollama:m:1"


def test_vllm_tensor_parallel_with_a_shared_gpu() -> None:
    p = vllm_rt.plan(spec("vllm", gpu_uuids=UUIDS, gpu_memory_fraction=0.25, max_model_len=4096, args=("--enforce-eager",)))
    assert p.argv == ("/opt/rt/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(HF_MODEL),
                      "--served-model-name", "chat", "--host", "127.0.0.1", "--port", "8001",
                      "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.25", "--max-model-len", "4096",
                      "--enforce-eager")
    assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(UUIDS) and p.env["HF_HUB_OFFLINE"] == "1"
    assert p.health == Probe("/health") and p.ready == Probe("/v1/models", expect_model="chat")
    assert p.startup_timeout_s == 20 * 60 and p.openai_base == "http://127.0.0.1:8001/v1"
    assert p.stream_usage and p.metrics_path == "/metrics" and p.upstream_model is None


def test_vllm_on_cpu_and_user_flags_win() -> None:
    p = vllm_rt.plan(spec("vllm", args=("-tp=1", "--max-model-len", "512"), max_model_len=4096,
                          env={"HF_HUB_OFFLINE": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout_s=90))
    assert "--tensor-parallel-size" not in p.argv and p.argv.count("--max-model-len") == 1
    assert "--gpu-memory-utilization" not in p.argv
    assert p.env["CUDA_VISIBLE_DEVICES"] == "" and p.env["HF_HUB_OFFLINE"] == "0" and p.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert p.startup_timeout_s == 90
    with pytest.raises(ValueError, match="model folder"):
        vllm_rt.plan(spec("vllm", model_path=None))


def test_vllm_sleep_mode_flag_dev_routes_and_controls() -> None:
    p = vllm_rt.plan(spec("vllm", sleep=True))
    assert p.argv.count("--enable-sleep-mode") == 1 and p.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert p.sleep is not None and p.sleep.sleep == ("POST", "/sleep?level=1")
    assert p.sleep.wake == ("POST", "/wake_up") and p.sleep.is_sleeping == "/is_sleeping"
    assert vllm_rt.plan(spec("vllm", sleep=True, args=("--enable-sleep-mode",))).argv.count("--enable-sleep-mode") == 1
    off = vllm_rt.plan(spec("vllm"))
    assert off.sleep is None and "--enable-sleep-mode" not in off.argv and "VLLM_SERVER_DEV_MODE" not in off.env
    # Runtimes without a sleep mode say so by leaving it out of the plan: the node then stops the worker.
    for name in ("llamacpp", "sglang"):
        path = HF_MODEL.parent / "tiny-chat.gguf" if name == "llamacpp" else HF_MODEL
        assert runtimes.get(name).plan(spec(name, sleep=True, model_path=path)).sleep is None


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_llama_server_argv_probes_and_what_it_cannot_serve() -> None:
    from runtimes import llamacpp as llamacpp_rt

    gguf = HF_MODEL.parent / "tiny-chat.gguf"
    p = llamacpp_rt.plan(spec("llamacpp", model_path=gguf, binary="/cache/bin/llama-server", args=("-t", "1")))
    assert p.argv == ("/cache/bin/llama-server", "-m", str(gguf), "--alias", "chat", "--host", "127.0.0.1",
                      "--port", "8001", "-c", "8192", "-np", "4", "--no-kv-unified", "--jinja", "--metrics", "-t", "1")
    assert p.health == Probe("/health") and p.ready == Probe("/v1/models", expect_model="chat")
    assert p.metrics_path == "/metrics" and p.concurrency == 4 and p.native_apis == ()
    assert p.env["CUDA_VISIBLE_DEVICES"] == ""
    assert set(p.cannot) == {"embeddings", "rerank"} and "--embeddings" in p.cannot["embeddings"]
    # The user's flags win: theirs are kept and the node adds none of the same.
    mine = llamacpp_rt.plan(spec("llamacpp", model_path=gguf, gpu_uuids=UUIDS[:1],
                                 args=("--parallel=8", "--no-jinja", "--ctx-size", "8192", "--embeddings", "--reranking")))
    assert mine.concurrency == 8 and mine.context_length == 8192 // 8 and mine.cannot == {}  # -c split among 8 slots
    assert "-np" not in mine.argv and "--jinja" not in mine.argv and "-c" not in mine.argv
    assert mine.env["CUDA_VISIBLE_DEVICES"] == UUIDS[0]
    assert llamacpp_rt.plan(spec("llamacpp", model_path=gguf)).argv[0] == "llama-server"  # looked up on PATH
    assert llamacpp_rt.version_argv(spec("llamacpp", binary="/x/llama-server")) == ("/x/llama-server", "--version")
    with pytest.raises(ValueError, match="GGUF"):
        llamacpp_rt.plan(spec("llamacpp", model_path=None))
    # What to build it from is data, pinned by digest; only llamacpp has a server the node builds.
    server = runtimes.server_binary("llamacpp")
    assert server is not None and server.build is not None and len(server.build.sha256) == 64
    assert "-DGGML_NATIVE=OFF" in server.build.cmake_args and server.build.gpu_cmake_args == ("-DGGML_CUDA=ON",)
    assert [n for n in runtimes.NAMES if runtimes.server_binary(n)] == ["llamacpp"]


def test_sglang_argv_and_probes() -> None:
    p = sglang_rt.plan(spec("sglang", gpu_uuids=UUIDS[:1], gpu_memory_fraction=0.4, max_model_len=8192))
    assert p.argv == ("/opt/rt/bin/python", "-m", "sglang.launch_server", "--model-path", str(HF_MODEL),
                      "--served-model-name", "chat", "--host", "127.0.0.1", "--port", "8001", "--tp", "1",
                      "--mem-fraction-static", "0.4", "--context-length", "8192")
    assert p.env["CUDA_VISIBLE_DEVICES"] == UUIDS[0]
    assert p.health == Probe("/health") and p.ready == Probe("/health_generate")
    assert p.startup_timeout_s == 20 * 60 and p.metrics_path is None
    assert sglang_rt.plan(spec("sglang", args=("--enable-metrics", "--tp-size", "1"))).metrics_path == "/metrics"
    assert sglang_rt.plan(spec("sglang", args=("--tp-size", "1"))).argv.count("--tp") == 0


def test_ollama_env_probes_and_warmup(tmp_path: Path) -> None:
    p = ollama_rt.plan(spec("ollama", source="ollama:qwen2.5:0.5b", model_path=tmp_path, binary="/usr/local/bin/ollama",
                            gpu_uuids=UUIDS[:1], max_model_len=4096))
    assert p.argv == ("/usr/local/bin/ollama", "serve")
    assert p.env["OLLAMA_HOST"] == "127.0.0.1:8001" and p.env["OLLAMA_MODELS"] == str(tmp_path)
    assert p.env["OLLAMA_KEEP_ALIVE"] == "-1" and p.env["CUDA_VISIBLE_DEVICES"] == UUIDS[0]
    assert p.env["OLLAMA_CONTEXT_LENGTH"] == "4096"
    assert p.health == Probe("/api/version") and p.ready == Probe("/v1/models", expect_model="qwen2.5:0.5b")
    assert p.warmup == (Warmup("/api/generate", {"model": "qwen2.5:0.5b", "prompt": "", "keep_alive": -1, "stream": False}),)
    assert p.context_length == 4096
    assert p.upstream_model == "qwen2.5:0.5b" and p.openai_base == "http://127.0.0.1:8001/v1"
    assert ollama_rt.plan(spec("ollama", model="llama3:latest", source="ollama:llama3", model_path=tmp_path)).upstream_model is None
    assert ollama_rt.version_argv(spec("ollama")) == ("ollama", "--version")


def test_ollama_names_and_mistakes(tmp_path: Path) -> None:
    assert ollama_rt.ollama_name("ollama:llama3.2") == "llama3.2:latest"
    assert ollama_rt.ollama_name("ollama:library/qwen:0.5b") == "qwen:0.5b"
    assert ollama_rt.ollama_name("ollama:myorg/model:v1") == "myorg/model:v1"
    assert ollama_rt.ollama_name("ollama:registry.ollama.ai/library/qwen") == "qwen:latest"
    assert ollama_rt.ollama_name("ollama:127.0.0.1:5000/library/tiny:q4") == "127.0.0.1:5000/library/tiny:q4"
    assert ollama_rt.ollama_name("ollama:127.0.0.1:5000/library/tiny") == "127.0.0.1:5000/library/tiny:latest"
    with pytest.raises(ValueError, match="ollama:NAME"):
        ollama_rt.plan(spec("ollama", source="hf:org/x", model_path=tmp_path))
    with pytest.raises(ValueError, match="takes no arguments"):
        ollama_rt.plan(spec("ollama", source="ollama:x", model_path=tmp_path, args=("--verbose",)))


@pytest.mark.parametrize("runtime,expected", [("vllm", "0.32.0+fake"), ("sglang", "0.5.23+fake")])
def test_version_through_the_runtimes_own_interpreter(runtime: str, expected: str) -> None:
    mod = runtimes.get(runtime)
    ok = subprocess.run(mod.version_argv(spec(runtime, python=FAKE_PYTHON)), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == expected
    # An interpreter without the runtime says which distributions it looked for.
    missing = subprocess.run(mod.version_argv(spec(runtime, python="python3")), capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "is installed" in missing.stderr


def test_ollama_version_without_a_server() -> None:
    out = subprocess.run(ollama_rt.version_argv(spec("ollama", binary=FAKE_OLLAMA)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip().splitlines()[-1] == "Warning: client version is 0.12.6"


# -- the stand-ins, launched by the adapters' own argv ------------------------------

class Launched:
    """A worker process started from a LaunchPlan, in its own session as the keeper does."""

    def __init__(self, plan: LaunchPlan, log: Path) -> None:
        self.plan = plan
        self.log = log
        self.proc = subprocess.Popen(plan.argv, env={**os.environ, **plan.env}, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def probe(self, probe: Probe) -> str:
        """'' when it passes, else why not: the supervisor's own probe (node/workers/probes.py)."""
        async def run() -> str:
            async with httpx.AsyncClient() as client:
                return await probes.check(client, self.plan, probe, timeout=2)
        return asyncio.run(run())

    def warm_up(self) -> str:
        """The plan's warm-up steps as the supervisor sends them; '' when all passed."""
        async def run() -> str:
            async with httpx.AsyncClient() as client:
                for step in self.plan.warmup:
                    if why := await probes.warm(client, self.plan, step, timeout=30):
                        return why
                return ""
        return asyncio.run(run())

    def wait(self, probe: Probe, timeout: float = 30) -> float:
        t0 = time.monotonic()
        why = "never probed"
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            why = self.probe(probe)
            if not why:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{probe.path} not passing after {timeout}s: {why}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    started: list[Launched] = []

    def go(plan: LaunchPlan) -> Launched:
        started.append(Launched(plan, tmp_path / f"worker{len(started)}.log"))
        return started[-1]

    yield go
    for w in started:
        if w.proc.poll() is None:
            os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(10)


def chat(base: str, model: str) -> tuple[str, dict]:
    """A streamed chat completion asking for usage: the text and the usage chunk."""
    text, usage = "", {}
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                text += "".join(c["delta"].get("content", "") for c in ev["choices"])
                usage = ev.get("usage") or usage
    return text, usage


def test_vllm_stand_in_serves_through_the_adapters_argv(launch, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    plan = vllm_rt.plan(spec("vllm", python=FAKE_PYTHON, port=free_port(), gpu_uuids=UUIDS, gpu_memory_fraction=0.3,
                             env={"FAKE_RUNTIME_RECORD": str(record), "FAKE_RUNTIME_START_DELAY_S": "0.5"}))
    w = launch(plan)
    w.wait(plan.ready)
    assert not w.probe(plan.health)
    seen = json.loads(record.read_text())
    assert seen["argv"][1:] == list(plan.argv[3:])  # the stand-in parsed exactly the adapter's flags
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(UUIDS) and seen["env"]["HF_HUB_OFFLINE"] == "1"
    text, usage = chat(plan.openai_base, "chat")
    assert text and usage["completion_tokens"] == 4
    emb = httpx.post(plan.openai_base + "/embeddings", json={"model": "chat", "input": ["a", "b"]}, timeout=10).json()
    assert len(emb["data"]) == 2
    assert httpx.post(plan.openai_base + "/completions", json={"model": "nope", "prompt": "x"}, timeout=10).status_code == 404
    assert "vllm:" in httpx.get(plan.root_url + plan.metrics_path, timeout=5).text
    assert w.stop() == 0


def test_vllm_stand_in_rejects_unknown_flags_like_vllm(launch) -> None:
    plan = vllm_rt.plan(spec("vllm", python=FAKE_PYTHON, port=free_port(), args=("--no-such-flag",)))
    w = launch(plan)
    assert w.proc.wait(30) == 2
    assert "api_server.py: error: unrecognized arguments: --no-such-flag" in w.log.read_text()


def test_vllm_stand_in_rejects_more_ranks_than_visible_gpus(launch) -> None:
    plan = vllm_rt.plan(spec("vllm", python=FAKE_PYTHON, port=free_port(), gpu_uuids=UUIDS[:1], args=("-tp", "2")))
    w = launch(plan)
    assert w.proc.wait(30) == 1 and "exceeds the 1 GPU(s)" in w.log.read_text()


def test_sglang_stand_in_is_unready_while_starting(launch) -> None:
    plan = sglang_rt.plan(spec("sglang", python=FAKE_PYTHON, port=free_port(), gpu_uuids=UUIDS[:1], gpu_memory_fraction=0.5,
                               env={"FAKE_RUNTIME_START_DELAY_S": "2"}))
    w = launch(plan)
    w.wait(Probe("/v1/models", expect_model="chat"))   # the port is open at once...
    assert w.probe(plan.ready) == "/health_generate: HTTP 503"  # ...but it is still starting
    w.wait(plan.ready)
    assert not w.probe(plan.health)
    text, usage = chat(plan.openai_base, "chat")
    assert text and usage["total_tokens"] > usage["completion_tokens"]
    assert w.stop() == 0


def ollama_tree(root: Path, name: str, tag: str, *, with_blob: bool = True, host: str = "registry.ollama.ai") -> None:
    """An OLLAMA_MODELS tree as `ollama pull` leaves it: a manifest and sha256-named blobs."""
    weights = b"GGUF fake weights"
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    if with_blob:
        (root / "blobs" / digest.replace(":", "-")).write_bytes(weights)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest, "size": 2},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(weights)}]}
    path = root / "manifests" / host / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))


def test_ollama_stand_in_loads_and_keeps_the_model(launch, tmp_path: Path) -> None:
    ollama_tree(tmp_path / "models", "qwen2.5", "0.5b")
    plan = ollama_rt.plan(spec("ollama", source="ollama:qwen2.5:0.5b", model_path=tmp_path / "models", binary=FAKE_OLLAMA,
                               port=free_port(), env={"FAKE_RUNTIME_LOAD_DELAY_S": "0.3"}))
    w = launch(plan)
    w.wait(plan.health)
    w.wait(plan.ready)
    assert httpx.get(plan.root_url + "/api/ps", timeout=5).json()["models"] == []
    assert w.warm_up() == ""                            # the warm-up, as the supervisor sends it
    loaded = httpx.get(plan.root_url + "/api/ps", timeout=5).json()["models"]
    assert [m["name"] for m in loaded] == ["qwen2.5:0.5b"] and loaded[0]["expires_at"].startswith("2318")
    text, usage = chat(plan.openai_base, plan.upstream_model or "chat")
    assert text and usage["completion_tokens"] == 4
    assert w.stop() == 0


def test_ollama_warmup_fails_clearly_when_the_blob_is_missing(launch, tmp_path: Path) -> None:
    ollama_tree(tmp_path / "models", "qwen2.5", "0.5b", with_blob=False)
    plan = ollama_rt.plan(spec("ollama", source="ollama:qwen2.5:0.5b", model_path=tmp_path / "models", binary=FAKE_OLLAMA,
                               port=free_port()))
    w = launch(plan)
    w.wait(plan.ready)
    why = w.warm_up()
    assert why.startswith("warm-up /api/generate: HTTP ") and "no model blob" in why


def test_ollama_model_from_another_registry_keeps_its_full_name(launch, tmp_path: Path) -> None:
    ollama_tree(tmp_path / "models", "tiny", "q4", host="127.0.0.1:5000")
    plan = ollama_rt.plan(spec("ollama", model="tiny", source="ollama:127.0.0.1:5000/library/tiny:q4",
                               model_path=tmp_path / "models", binary=FAKE_OLLAMA, port=free_port()))
    assert plan.upstream_model == "127.0.0.1:5000/library/tiny:q4"
    w = launch(plan)
    w.wait(plan.ready)
    assert w.warm_up() == ""


def test_ollama_stand_in_rejects_what_ollama_rejects() -> None:
    for argv, message in ((["serve", "--port", "1"], "Error: unknown flag: --port"),
                          (["serve", "extra"], "Error: accepts 0 arg(s), received 1"),
                          (["launch"], 'Error: unknown command "launch" for "ollama"')):
        out = subprocess.run([FAKE_OLLAMA, *argv], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and message in out.stderr


# -- behind a real node ------------------------------------------------------------

STAND_INS = f"""
[[models]]
name = "tiny-vllm"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"

[[models]]
name = "tiny-sglang"
source = "builtin:tiny-chat#hf/*"
runtime = "sglang"
env = {{ FAKE_RUNTIME_START_DELAY_S = "1" }}

[runtimes.vllm]
python = "{FAKE_PYTHON}"

[runtimes.sglang]
python = "{FAKE_PYTHON}"
"""


def test_stand_ins_serve_behind_the_node(node_factory) -> None:
    """`[runtimes.X] python = <stand-in interpreter>` runs the adapters' argv for real under the supervisor."""
    node = node_factory(STAND_INS)
    key = node.create_key()
    for model in ("tiny-vllm", "tiny-sglang"):
        r = httpx.post(node.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "the quick brown"
    states = {w["model"]: (w["runtime"], w["state"]) for w in node.workers()}
    assert states == {"tiny-vllm": ("vllm", "ready"), "tiny-sglang": ("sglang", "ready")}


@pytest.mark.skipif(bool(discover().gpus), reason="this box has a GPU, so the model would be placed")
def test_gpu_model_on_a_box_without_driver_is_unplaceable_not_fatal(node_factory) -> None:
    node = node_factory(STAND_INS.replace('runtime = "vllm"', 'runtime = "vllm"\ngpus = 1'), ready=False)
    wait, states = time.monotonic() + 60, {}
    while time.monotonic() < wait:
        try:
            states = {w["model"]: w for w in node.workers()}
        except (httpx.HTTPError, OSError, ValueError):  # not listening yet
            pass
        if states.get("tiny-sglang", {}).get("state") == "ready":
            break
        time.sleep(0.3)
    held = states["tiny-vllm"]
    assert held["state"] == "pending" and "no NVIDIA driver found" in (held["last_error"] or "")
    ready = httpx.get(node.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and "no NVIDIA driver found" in ready.text


@pytest.mark.parametrize("runtime, kw, expected", [
    ("llamacpp", {}, 4),                                   # llama-server's parallel slots (-np), a few by default
    ("llamacpp", {"concurrency": 2}, 2),                   # the model's concurrency wins (and is passed as -np)
    ("vllm", {}, 256),                                     # vLLM's own --max-num-seqs default
    ("vllm", {"concurrency": 8}, 8),
    ("vllm", {"args": ("--max-num-seqs", "32")}, 32),      # the user's flag wins over everything
    ("vllm", {"concurrency": 8, "args": ("--max-num-seqs=16",)}, 16),
    ("sglang", {}, 64),
    ("sglang", {"concurrency": 5}, 5),
    ("ollama", {"source": "ollama:tiny"}, 1),
    ("ollama", {"source": "ollama:tiny", "env": {"OLLAMA_NUM_PARALLEL": "4"}}, 4),
    ("ollama", {"source": "ollama:tiny", "concurrency": 2}, 2),
    ("external", {"url": "http://127.0.0.1:9/v1"}, 64),
    ("external", {"url": "http://127.0.0.1:9/v1", "concurrency": 3}, 3),
])
def test_concurrency_from_the_launch_plan(runtime: str, kw: dict, expected: int) -> None:
    p = runtimes.get(runtime).plan(spec(runtime, **kw))
    assert p.concurrency == expected
    if kw.get("concurrency") and runtime in ("vllm", "sglang") and not kw.get("args"):
        flag = "--max-num-seqs" if runtime == "vllm" else "--max-running-requests"
        assert flag_value(p.argv, flag) == str(kw["concurrency"])
    if kw.get("concurrency") and runtime == "ollama":
        assert p.env["OLLAMA_NUM_PARALLEL"] == str(kw["concurrency"])


def test_vllm_priorities_only_with_its_priority_policy() -> None:
    assert runtimes.get("vllm").plan(spec("vllm")).priorities is None
    p = runtimes.get("vllm").plan(spec("vllm", args=("--scheduling-policy", "priority")))
    assert p.priorities == {"interactive": 0, "batch": 1}  # lower is served earlier in vLLM
    assert runtimes.get("vllm").plan(spec("vllm", args=("--scheduling-policy=fcfs",))).priorities is None
    for other in ("llamacpp", "sglang"):
        assert runtimes.get(other).plan(spec(other)).priorities is None
