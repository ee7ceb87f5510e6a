"""One replica: its keeper process, readiness, liveness and restarts.

One asyncio task (`Replica.run`) owns each replica's process and state; everyone else
only reads its status or sends it requests (`stop`, `restart`). This module is the
home of subprocess in the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import httpx

import runtimes
from node.config import SupervisorSection
from node.keeper import owner_token, process_start_time, token_alive
from node.states import WorkerState, check_transition
from runtimes import LaunchPlan, WorkerSpec

S = WorkerState


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free on loopback now (a worker that loses the race restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spec_hash(spec: WorkerSpec) -> str:
    """A digest of everything that makes a replica different, except its port."""
    body = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.__dict__.items() if k != "port"}
    body["env"] = dict(sorted(spec.env.items()))
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tail_lines(path: Path, n: int = 20, max_bytes: int = 16384) -> list[str]:
    """The last n lines of a log file (cheaply, from its end)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return [ln for ln in lines if not ln.startswith("[keeper]")][-n:]


@dataclass
class Adoptable:
    """A keeper left running by an earlier node, found through its state file."""

    id: str
    keeper_pid: int
    port: int
    spec_hash: str
    state_file: Path


class KeeperHandle:
    """A running keeper: started by us (a child we reap) or adopted (watched by pidfd)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)

    async def wait(self) -> None:
        """Return once the keeper has exited (reaping it when it is our child)."""
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._pidfd, lambda: fut.done() or fut.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(self._pidfd)
        else:  # no pidfd: poll
            while self.alive():
                await asyncio.sleep(0.2)
        if self.popen is not None:
            self.popen.wait()

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return process_start_time(self.pid) is not None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


@dataclass
class ReplicaStatus:
    id: str
    model: str
    replica: int
    runtime: str
    state: str
    since: float
    restarts: int
    port: int | None
    pid: int | None
    gpus: list[str]
    last_error: str
    adopted: bool
    inflight: int


@dataclass
class Replica:
    """A model replica and the task that keeps it running."""

    spec: WorkerSpec
    settings: SupervisorSection
    run_dir: Path
    log_dir: Path
    probe_client: httpx.AsyncClient
    on_change: Callable[["Replica"], None] = lambda r: None
    adopt: Adoptable | None = None
    adopt_grace_s: float = 30.0
    state: WorkerState = S.PENDING
    since: float = field(default_factory=time.time)
    restarts: int = 0
    last_error: str = ""
    inflight: int = 0
    plan: LaunchPlan | None = None
    keeper: KeeperHandle | None = None
    adopted: bool = False
    worker_pid: int | None = None

    def __post_init__(self) -> None:
        self.id = f"{self.spec.model}-{self.spec.replica}"
        self.hash = spec_hash(self.spec)
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.recent_failures: deque[float] = deque()
        self.held = False

    # -- requests from outside -------------------------------------------------
    def start(self) -> asyncio.Task:
        """Start the owning task (idempotent)."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.create_task(self.run(), name=f"replica:{self.id}")
        return self._task

    async def stop(self) -> None:
        """Stop the worker and wait until it is gone."""
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def openai_base(self) -> str:
        assert self.plan is not None
        return self.plan.openai_base

    def hold(self, state: WorkerState, reason: str) -> None:
        """Keep a replica that cannot start in `pending` or `failed`, saying why."""
        self.held = True
        self.state, self.since, self.last_error = state, time.time(), reason
        self.on_change(self)

    def restart(self) -> None:
        """Ask for a restart now (also leaves `failed`), without backoff."""
        self._restart.set()

    async def detach(self) -> None:
        """Stop watching without stopping the worker (its keeper waits for a successor)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.keeper:
            self.keeper.close()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.id}.log"

    @property
    def state_file(self) -> Path:
        return self.run_dir / f"{self.id}.json"

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            id=self.id, model=self.spec.model, replica=self.spec.replica, runtime=self.spec.runtime,
            state=self.state.value, since=self.since, restarts=self.restarts,
            port=self.spec.port if self.plan else None, pid=self.worker_pid,
            gpus=list(self.spec.gpu_uuids), last_error=self.last_error, adopted=self.adopted,
            inflight=self.inflight,
        )

    # -- the owning task -------------------------------------------------------
    def _set(self, new: WorkerState, error: str | None = None) -> None:
        check_transition(self.state, new)
        self.state, self.since = new, time.time()
        if error is not None:
            self.last_error = error
        self.on_change(self)

    async def run(self) -> None:
        backoff = self.settings.backoff_initial_s
        try:
            while not self._stop.is_set():
                self._restart.clear()
                why = await self._one_life()
                if self._stop.is_set():
                    break
                if self._restart.is_set():  # asked for: no backoff, no failure counted
                    self._set(S.RESTARTING)
                    continue
                self.restarts += 1
                now = time.monotonic()
                self.recent_failures.append(now)
                self.last_error = why
                if len(self.recent_failures) >= self.settings.crash_loop_limit:
                    lines = "\n".join(tail_lines(self.log_path, 15))
                    self._set(S.FAILED, f"crash loop: {why}" + (f"\n{lines}" if lines else ""))
                    await self._wait_any(self._stop, self._restart)
                    if self._stop.is_set():
                        break
                    self.recent_failures.clear()
                    backoff = self.settings.backoff_initial_s
                    continue
                self._set(S.RESTARTING)
                await self._wait_any(self._stop, self._restart, timeout=backoff)
                backoff = min(backoff * 2, self.settings.backoff_max_s)
        finally:
            if self.state not in (S.STOPPED,):
                if self.state is not S.STOPPING:
                    self._set(S.STOPPING)
                await self._terminate()
                self._set(S.STOPPED)

    async def _one_life(self) -> str:
        """Start (or adopt) the worker, wait until ready, watch it; return why it ended."""
        if self.adopt is not None:
            adopt, self.adopt = self.adopt, None
            self.spec = replace(self.spec, port=adopt.port)
            self.plan = runtimes.get(self.spec.runtime).plan(self.spec)
            self.keeper = KeeperHandle(adopt.keeper_pid)
            self.adopted = True
            self._read_worker_pid()
        else:
            if self.spec.runtime != "external":
                self.spec = replace(self.spec, port=free_port())
            self.plan = runtimes.get(self.spec.runtime).plan(self.spec)
            self.adopted = False
            if self.plan.argv:
                self._spawn()
        self._set(S.STARTING)
        why = await self._await_ready()
        if why:
            await self._terminate()
            return why
        self._set(S.READY, "")
        ready_at = time.monotonic()
        why = await self._watch()
        if time.monotonic() - ready_at >= self.settings.stable_after_s:
            self.recent_failures.clear()
        await self._terminate()
        return why

    def _spawn(self) -> None:
        assert self.plan is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        info = {"id": self.id, "port": self.spec.port, "spec_hash": self.hash, "model": self.spec.model}
        env = {**os.environ, **self.plan.env}
        keeper_log = self.log_path.open("ab")
        argv = [
            sys.executable, "-m", "node.keeper",
            "--state", str(self.state_file),
            "--owner", owner_token(),
            "--owner-file", str(self.run_dir / "owner"),
            "--grace", str(self.adopt_grace_s),
            "--stop-timeout", str(self.settings.stop_timeout_s),
            "--log", str(self.log_path),
            "--log-max-bytes", str(self.settings.log_max_bytes),
            "--log-backups", str(self.settings.log_backups),
            "--info", json.dumps(info),
            "--", *self.plan.argv,
        ]
        popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=keeper_log, stderr=keeper_log,
            start_new_session=True, close_fds=True,
        )
        keeper_log.close()
        self.keeper = KeeperHandle(popen.pid, popen)
        self.worker_pid = None

    def _read_worker_pid(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            self.worker_pid = json.loads(self.state_file.read_text())["worker_pid"]

    def _exit_summary(self) -> str:
        try:
            info = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            info = {}
        code = info.get("exit_code")
        if code is None and self.keeper and self.keeper.popen is not None:
            code = self.keeper.popen.returncode
        what = f"worker exited with code {code}" if code is not None and code >= 0 else (
            f"worker killed by signal {-code}" if code is not None else "worker exited")
        last = tail_lines(self.log_path, 3)
        return what + (f": {last[-1]}" if last else "")

    async def _probe(self, probe: runtimes.Probe) -> str:
        """'' when the probe passes, else why not."""
        assert self.plan is not None
        try:
            r = await self.probe_client.get(self.plan.root_url + probe.path, timeout=self.settings.probe_timeout_s)
        except httpx.HTTPError as exc:
            return f"{probe.path}: {type(exc).__name__}"
        if r.status_code != 200:
            return f"{probe.path}: HTTP {r.status_code}"
        if probe.expect_model:
            try:
                ids = [m.get("id") for m in r.json().get("data", [])]
            except (ValueError, AttributeError):
                return f"{probe.path}: not a model list"
            if probe.expect_model not in ids:
                return f"{probe.path}: {probe.expect_model} not listed yet"
        return ""

    async def _await_ready(self) -> str:
        """'' once ready; else why not (deadline passed, or the process exited: at once)."""
        assert self.plan is not None
        deadline = time.monotonic() + self.plan.startup_timeout_s
        delay = 0.1
        why = "not probed"
        while time.monotonic() < deadline:
            if self._stop.is_set() or self._restart.is_set():
                return "stop requested"
            if self.keeper is not None and not self.keeper.alive():
                return self._exit_summary() + " (during start-up)"
            if self.worker_pid is None and self.keeper is not None:
                self._read_worker_pid()
            why = await self._probe(self.plan.ready)
            if not why:
                return ""
            await self._sleep_or_exit(delay)
            delay = min(delay * 1.5, 1.0)
        return f"not ready within {self.plan.startup_timeout_s:.0f}s ({why})"

    async def _sleep_or_exit(self, seconds: float) -> None:
        waits = [asyncio.create_task(self._stop.wait()), asyncio.create_task(self._restart.wait())]
        if self.keeper is not None:
            waits.append(asyncio.create_task(self.keeper.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _watch(self) -> str:
        """Probe liveness until the worker dies, stays unhealthy, or a stop/restart is asked."""
        assert self.plan is not None
        failures = 0
        while True:
            await self._sleep_or_exit(self.settings.probe_interval_s)
            if self._stop.is_set() or self._restart.is_set():
                return "stop requested"
            if self.keeper is not None and not self.keeper.alive():
                return self._exit_summary()
            why = await self._probe(self.plan.health)
            if not why:
                if self.state is S.UNHEALTHY:
                    self._set(S.READY, "")
                failures = 0
                continue
            failures += 1
            if failures >= self.settings.probe_failures and self.state is S.READY:
                self._set(S.UNHEALTHY, f"liveness probe failing: {why}")
            if failures >= 2 * self.settings.probe_failures:
                if not self.plan.argv:  # external: nothing to restart, keep probing
                    continue
                return f"liveness probe failed {failures} times: {why}"

    async def _terminate(self) -> None:
        """Stop the keeper (which stops the worker's process group) and reap it."""
        keeper, self.keeper = self.keeper, None
        if keeper is None:
            return
        if keeper.alive():
            keeper.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(keeper.wait(), self.settings.stop_timeout_s + 5)
            except asyncio.TimeoutError:
                keeper.signal(signal.SIGKILL)  # the worker dies with it (PDEATHSIG)
                await keeper.wait()
        else:
            await keeper.wait()
        keeper.close()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self.worker_pid = None

    @staticmethod
    async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
        tasks = [asyncio.create_task(e.wait()) for e in events]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()


def find_adoptable(run_dir: Path) -> dict[str, Adoptable]:
    """Keepers left by an earlier node that are still alive, by replica id."""
    found: dict[str, Adoptable] = {}
    for path in sorted(run_dir.glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        token = info.get("keeper", "")
        if info.get("exited") or not token_alive(token):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        found[info["id"]] = Adoptable(
            id=info["id"], keeper_pid=info["keeper_pid"], port=info["port"],
            spec_hash=info["spec_hash"], state_file=path,
        )
    return found
