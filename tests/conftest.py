"""Shared fixtures: a node started for real (`infernode up` as a subprocess) on a temp dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
# Tests that fake GPUs (tests/fakes/nvml.py) must not make a node build a CUDA llama-server:
# the tiny model runs on the CPU, and this box's CUDA compiler (from a wheel) has no cuBLAS.
os.environ.setdefault("INFERNODE_BUILD_GPU", "0")
INFERNODE = [sys.executable, "-m", "node"]
_llama_server: list[Path] = []


def llama_server() -> Path:
    """The real llama-server the tiny-model tests run: the node's own lookup (PATH, then the build cache).

    When there is none yet it is built once, as a user would (`infernode runtimes build llamacpp`:
    the pinned sources, verified, built and cached; a second test process waits on the cache's
    lock and then finds it). `.ci/run` builds it before the tests, so there this only looks.
    """
    if _llama_server:
        return _llama_server[0]
    from node.supply.builds import ServerCache, cache_root, locate
    from runtimes import llamacpp

    found = locate(llamacpp.SERVER, None, ServerCache(cache_root()))
    if found is None:
        subprocess.run(INFERNODE + ["runtimes", "build", "llamacpp"], cwd=REPO, check=True, timeout=3600)
        found = locate(llamacpp.SERVER, None, ServerCache(cache_root()))
    assert found is not None, "infernode runtimes build llamacpp left no llama-server"
    _llama_server.append(found)
    return found


# What a test module names when it runs the real tiny model (directly or through a fixture).
USES_LLAMA_SERVER = ("TINY_MODEL", "tiny_node", "node_factory", "api_node", "llama_server(")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build llama-server once, before the first test, when the chosen tests need it and it is missing.

    Here rather than inside a test: a cold build takes minutes, past any one test's timeout.
    """
    if session.config.option.collectonly:
        return
    files = {Path(str(item.fspath)) for item in session.items}
    if any(word in f.read_text(errors="replace") for f in files if f.suffix == ".py" for word in USES_LLAMA_SERVER):
        llama_server()


def ensure_llama_server(config_text: str) -> None:
    """Build llama-server first (not inside a node's startup timeout) when a config runs the default llamacpp."""
    if 'runtime = "llamacpp"' in config_text and "[runtimes.llamacpp]" not in config_text:
        llama_server()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(dir: Path, models_toml: str, *, port: int | None = None, extra: str = "") -> Path:
    """An appliance.toml in dir with fast supervision settings for tests."""
    port = port or free_port()
    (dir / "appliance.toml").write_text(f"""
[node]
name = "test-node"
listen = "127.0.0.1:{port}"
data_dir = "data"
adopt_grace_s = 3
drain_grace_s = 5
# pacing of failed authentication off: tests send many bad credentials from 127.0.0.1 (on in
# tests/test_frontdoor_tenants.py)
auth_failures_per_minute = 0

[supervisor]
backoff_initial_s = 0.2
backoff_max_s = 2
stable_after_s = 5
crash_loop_limit = 4
probe_interval_s = 0.5
probe_timeout_s = 2
probe_failures = 2
stop_timeout_s = 5

{models_toml}
{extra}
""")
    return dir / "appliance.toml"


TINY_MODEL = """
[[models]]
name = "tiny-chat"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
args = ["-t", "1"]
"""


def run_cli(*args: str, config: Path | None = None, env: dict | None = None, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
    argv = INFERNODE + list(args) + (["--config", str(config)] if config else [])
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{argv} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@dataclass
class NodeProc:
    """A running `infernode up`."""

    config: Path
    proc: subprocess.Popen
    url: str
    log: Path
    env: dict = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.config.parent / "data"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.admin_key}"}, timeout=30)

    def create_key(self, **fields) -> str:
        with self.admin() as c:
            r = c.post("/admin/v1/keys", json={"name": "test", **fields})
            r.raise_for_status()
            return r.json()["key"]

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                last = httpx.get(self.url + "/readyz", timeout=2)
                if last.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout}s: {last and last.text}\n{self.log.read_text()[-4000:]}")

    def workers(self) -> list[dict]:
        with self.admin() as c:
            return c.get("/admin/v1/workers").json()["data"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_node(config: Path, env: dict | None = None, lock: bool = True) -> NodeProc:
    ensure_llama_server(config.read_text())
    if lock:
        run_cli("lock", config=config, check=True)
    port = int(config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
    log = config.parent / "node.log"
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(INFERNODE + ["up", "--config", str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=full_env, cwd=REPO)
    return NodeProc(config=config, proc=proc, url=f"http://127.0.0.1:{port}", log=log, env=env or {})


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    """Start nodes on temp configs; every one is stopped (and its workers checked gone) at the end."""
    started: list[NodeProc] = []

    def make(models_toml: str = TINY_MODEL, *, extra: str = "", env: dict | None = None, ready: bool = True,
             dir: Path | None = None) -> NodeProc:
        d = dir or tmp_path / f"node{len(started)}"
        d.mkdir(exist_ok=True)
        cfg = write_config(d, models_toml, extra=extra)
        n = start_node(cfg, env)
        started.append(n)
        if ready:
            n.wait_ready()
        return n

    yield make
    for n in started:
        n.stop()


@pytest.fixture
def tiny_node(node_factory) -> NodeProc:
    return node_factory()


def descendants_of_keepers(data_dir: Path) -> list[int]:
    """Pids of live processes whose command line mentions this node's data dir."""
    out = []
    needle = str(data_dir)
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if needle in cmd and stat.rpartition(")")[2].split()[0] != "Z":
            out.append(int(p.name))
    return out


def wait_until(fn, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(interval)
    return fn()


# -- the client-API tests (tests/test_api_*.py) ---------------------------------------
API_STUB_CONTEXT = 4096


@pytest.fixture(scope="module")
def api_node(tmp_path_factory) -> Iterator[tuple[NodeProc, str, str]]:
    """A node with `stub-model` (the stand-in worker, external), `tiny-chat` (real llama-server) and
    `tiny-vllm` (vLLM's stand-in, which serves the Responses API itself).

    Yields (node, stub url, key).
    """
    d: Path = tmp_path_factory.mktemp("apis")
    from tests.fakes import openai_worker

    port = free_port()
    stub = openai_worker.start(port)
    models = TINY_MODEL + f"""
[[models]]
name = "stub-model"
runtime = "external"
url = "http://127.0.0.1:{port}/v1"
max_model_len = {API_STUB_CONTEXT}

[[models]]
name = "tiny-vllm"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"

[runtimes.vllm]
python = "{REPO / 'tests' / 'fakes' / 'bin' / 'python'}"
"""
    node = start_node(write_config(d, models))
    try:
        node.wait_ready(timeout=180)
        key = node.create_key()
        yield node, f"http://127.0.0.1:{port}", key
    finally:
        node.stop()
        stub.kill()
        stub.wait()
