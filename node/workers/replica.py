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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

import runtimes
from node.config import SupervisorSection
from node.workers import probes
from node.workers.handles import Adoptable, KeeperHandle
from node.workers.keeper import owner_token
from node.workers.serving import Serving
from node.workers.states import WorkerState, check_transition
from node.workers.worklog import exit_summary, tail_lines
from runtimes import LaunchPlan, WorkerSpec

S = WorkerState
# Readiness polling: fast at first (a small model is up in well under a second), then
# backing off; the cap bounds what polling adds to a load (bench/swap.py measures it).
READY_POLL_FIRST_S = 0.02
READY_POLL_MAX_S = 0.1


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free on loopback now (a worker that loses the race restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spec_hash(spec: WorkerSpec) -> str:
    """A digest of everything that makes a replica different, except its port."""
    body = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.__dict__.items() if k != "port"}
    if body.get("api_key") is None:  # unset (every launched runtime): hashes stay those of earlier versions
        body.pop("api_key", None)
    if not spec.sleep:  # added later: hashed only when set, so an upgraded node still adopts older workers
        del body["sleep"]
    body["env"] = dict(sorted(spec.env.items()))
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    load: str = "always"            # "on_demand": loaded by requests, unloaded when idle
    sleeping: bool = False          # asleep through the runtime's sleep mode (process kept, GPU freed)
    idle_s: float | None = None     # on-demand: seconds since its last request


@dataclass
class Replica(Serving):
    """A model replica and the task that keeps it running."""

    spec: WorkerSpec
    settings: SupervisorSection
    run_dir: Path
    log_dir: Path
    probe_client: httpx.AsyncClient
    on_change: Callable[[Replica], None] = lambda r: None
    adopt: Adoptable | None = None
    adopt_grace_s: float = 30.0
    probe_inference: bool = False   # also send a real one-token completion every few probes
    state: WorkerState = S.PENDING
    since: float = field(default_factory=time.time)
    restarts: int = 0
    last_error: str = ""
    plan: LaunchPlan | None = None
    keeper: KeeperHandle | None = None
    adopted: bool = False
    worker_pid: int | None = None
    need_bytes: int = 0             # GPU memory placement charged for it on each of its GPUs

    def __post_init__(self) -> None:
        self.id = f"{self.spec.model}-{self.spec.replica}"
        self.hash = spec_hash(self.spec)
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.recent_failures: deque[float] = deque()
        self.held = False
        self.backoff_s = self.settings.backoff_initial_s  # the wait before the next restart
        self._was_stable = False
        self._detaching = False

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
        self._detaching = True  # the owning task must not stop the worker on its way out
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
        """Keep the worker alive: restart with doubling backoff, end a crash loop in `failed`."""
        self.backoff_s = self.settings.backoff_initial_s
        try:
            while not self._stop.is_set():
                self._restart.clear()
                try:
                    why = await self._one_life()
                except Exception as exc:  # a bug or a bad plan must not leave the replica looking alive
                    await self._terminate()
                    self._set(S.FAILED, f"cannot start: {type(exc).__name__}: {exc}")
                    await self._wait_any(self._stop, self._restart)
                    continue
                if self._stop.is_set():
                    break
                if self._restart.is_set():  # asked for: no backoff, no failure counted
                    self._set(S.RESTARTING)
                    continue
                if self._was_stable:  # it ran fine for a while: this crash starts a fresh count
                    self.recent_failures.clear()
                    self.backoff_s = self.settings.backoff_initial_s
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
                    self.backoff_s = self.settings.backoff_initial_s
                    continue
                self._set(S.RESTARTING)
                await self._wait_any(self._stop, self._restart, timeout=self.backoff_s)
                self.backoff_s = min(self.backoff_s * 2, self.settings.backoff_max_s)
        finally:
            if self._detaching:
                pass
            elif self.state is S.PENDING:  # stopped before it ever started
                self._set(S.STOPPED)
            elif self.state is not S.STOPPED:
                if self.state is not S.STOPPING:
                    self._set(S.STOPPING)
                await self._terminate()
                self._set(S.STOPPED)

    async def _one_life(self) -> str:
        """Start (or adopt) the worker, wait until ready, watch it; return why it ended."""
        self._was_stable = False
        self._launch()
        self._set(S.STARTING)
        why = await self._await_ready() or await self._warm_up()
        if why:
            await self._terminate()
            return why
        self._set(S.READY, "")
        ready_at = time.monotonic()
        why = await self._watch()
        self._was_stable = time.monotonic() - ready_at >= self.settings.stable_after_s
        await self._terminate()
        return why

    def _launch(self) -> None:
        """Adopt the worker an earlier node left (self.adopt), or spawn a new one."""
        if self.adopt is not None:
            adopt, self.adopt = self.adopt, None
            self.spec = replace(self.spec, port=adopt.port)
            self.plan = runtimes.get(self.spec.runtime).plan(self.spec)
            self.keeper = KeeperHandle(adopt.keeper_pid)
            self.adopted = True
            self._read_worker_pid()
        else:
            if runtimes.launched(self.spec.runtime):
                self.spec = replace(self.spec, port=free_port())
            self.plan = runtimes.get(self.spec.runtime).plan(self.spec)
            self.adopted = False
            if self.plan.argv:
                self._spawn()

    async def _warm_up(self) -> str:
        """Run the plan's warm-up steps (health has passed; not yet READY); '' when done."""
        assert self.plan is not None
        for step in self.plan.warmup:
            why = await probes.warm(self.probe_client, self.plan, step, self.plan.startup_timeout_s)
            if why:
                return why
        return ""

    def _spawn(self) -> None:
        assert self.plan is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        info = {"id": self.id, "port": self.spec.port, "spec_hash": self.hash, "model": self.spec.model,
                # Where it was placed, so a successor can rebuild an on-demand replica's spec to adopt it.
                "gpus": list(self.spec.gpu_uuids), "fraction": self.spec.gpu_memory_fraction,
                "need_bytes": self.need_bytes}
        env = {**os.environ, **self.plan.env}
        keeper_log = self.log_path.open("ab")
        argv = [
            sys.executable, "-m", "node.workers.keeper",
            "--state", str(self.state_file),
            "--owner", owner_token(),
            "--owner-file", str(self.run_dir / "owner"),
            "--grace", str(self.adopt_grace_s),
            "--stop-timeout", str(self.settings.stop_timeout_s),
            "--log", str(self.log_path),
            "--log-max-bytes", str(self.settings.log_max_bytes),
            "--log-backups", str(self.settings.log_backups),
            "--info", json.dumps(info),
            "--nice", str(self.settings.worker_nice),
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
        popen = self.keeper.popen if self.keeper else None
        return exit_summary(self.state_file, self.log_path, popen.returncode if popen is not None else None)

    async def _probe(self, probe: runtimes.Probe) -> str:
        """'' when the probe passes, else why not."""
        assert self.plan is not None
        return await probes.check(self.probe_client, self.plan, probe, self.settings.probe_timeout_s)

    async def _await_ready(self, timeout_s: float | None = None) -> str:
        """'' once ready; else why not (deadline passed, or the process exited: at once)."""
        assert self.plan is not None
        timeout_s = timeout_s or self.plan.startup_timeout_s
        deadline = time.monotonic() + timeout_s
        delay = READY_POLL_FIRST_S
        why = "not probed"
        while time.monotonic() < deadline:
            if self._interrupt():
                return "stop requested"
            if self.keeper is not None and not self.keeper.alive():
                return self._exit_summary() + " (during start-up)"
            if self.worker_pid is None and self.keeper is not None:
                self._read_worker_pid()
            why = await self._probe(self.plan.ready)
            if not why:
                return ""
            await self._sleep_or_exit(delay)
            delay = min(delay * 1.5, READY_POLL_MAX_S)
        return f"not ready within {timeout_s:.0f}s ({why})"

    def _interrupt(self) -> str:
        """Why watching must end now ('' to go on): a stop or restart was asked."""
        return "stop requested" if self._stop.is_set() or self._restart.is_set() else ""

    def _wakers(self) -> list[asyncio.Event]:
        """The events that end a wait between probes."""
        return [self._stop, self._restart]

    def _tick_s(self) -> float:
        """How often the watch looks at `_interrupt` (probes still go every probe_interval_s)."""
        return self.settings.probe_interval_s

    async def _sleep_or_exit(self, seconds: float) -> None:
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(e.wait()) for e in self._wakers()]
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
        count = 0
        infer_failing = False  # once a completion fails, try one every probe until one works
        next_probe = time.monotonic() + self.settings.probe_interval_s
        while True:
            await self._sleep_or_exit(max(0.0, min(self._tick_s(), next_probe - time.monotonic())))
            why = self._interrupt()
            if why:
                return why
            if self.keeper is not None and not self.keeper.alive():
                return self._exit_summary()
            if time.monotonic() < next_probe:
                continue
            next_probe = time.monotonic() + self.settings.probe_interval_s
            count += 1
            why = await self._probe(self.plan.health)
            if not why and self.probe_inference and (infer_failing or count % self.settings.inference_probe_every == 0):
                why = await probes.infer(self.probe_client, self.plan, self.spec.model,
                                         self.settings.inference_probe_timeout_s)
                infer_failing = bool(why)
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
            except TimeoutError:
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
