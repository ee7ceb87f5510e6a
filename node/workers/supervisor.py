"""The supervisor: reconciles the replicas that run with the ones placement wants.

It turns placed replicas into worker specs (checking the lock, the store and the
runtime first), adopts workers a previous node left running, starts and stops
replicas, and keeps the router's view of ready replicas current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

import runtimes
from node.config import Config, ModelConfig
from node.supply.builds import BuildError, LogBuildProgress, ServerCache, cache_root, locate
from node.supply.lockfile import LockFile
from node.supply.resolve import stale_models
from node.supply.store import Store
from node.workers.gpus import Inventory
from node.workers.handles import claim_workers, find_adoptable
from node.workers.keeper import owner_token, process_start_time
from node.workers.ondemand import OnDemandReplica
from node.workers.placement import Placed, place
from node.workers.replica import Replica, spec_hash
from node.workers.router import Router
from node.workers.states import WorkerState
from runtimes import WorkerSpec

log = logging.getLogger("infernode.supervisor")
S = WorkerState


@dataclass
class RuntimeCheck:
    ok: bool
    detail: str   # the version, or why it is not usable


class Supervisor:
    def __init__(self, config: Config, lock: LockFile, store: Store, inventory: Inventory, router: Router,
                 probe_client: httpx.AsyncClient, *, on_change: Callable[[Replica], None] = lambda r: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.lock, self.store, self.inventory = config, lock, store, inventory
        self.router = router
        self.probe_client = probe_client
        self.on_change_hook = on_change
        self.replicas: dict[str, Replica] = {}
        self.run_dir = config.data_dir / "run" / "workers"
        self.log_dir = config.data_dir / "logs"
        self.runtime_checks: dict[str, RuntimeCheck] = {}
        self._store_problems: dict[str, str] = {}
        self.clock = clock  # the idle timers' clock (tests pass their own)
        self.server_cache = ServerCache(cache_root(), gpus=bool(inventory.gpus))
        self.servers: dict[str, str] = {}  # runtime -> the server executable found or built for it

    # -- building specs ----------------------------------------------------------
    def _python(self, runtime: str) -> str:
        rs = self.config.runtime_settings(runtime)
        return str(rs.python) if rs.python else sys.executable

    def _binary(self, runtime: str) -> str | None:
        if runtime in self.servers:
            return self.servers[runtime]
        rs = self.config.runtime_settings(runtime)
        return str(rs.binary) if rs.binary else None

    async def _find_server(self, runtime: str, server: runtimes.ServerBinary, build: bool) -> RuntimeCheck | None:
        """Find the runtime's server (configured, PATH, cache), building it when allowed; a failed check if not."""
        configured = self.config.runtime_settings(runtime).server
        try:
            found = locate(server, str(configured) if configured else None, self.server_cache)
        except BuildError as exc:  # e.g. a bad INFERNODE_BUILD_GPU
            return RuntimeCheck(False, f"{runtime}: {exc.message}")
        if found is None and configured is None and build:
            log.info("%s: %s is not on PATH and not built yet: building it from pinned sources "
                     "(once per machine; minutes)", runtime, server.name)
            cancel = threading.Event()
            try:
                found = await asyncio.to_thread(self.server_cache.ensure, server,
                                                LogBuildProgress(log, f"{runtime}: {server.name}"), cancel)
            except BuildError as exc:
                return RuntimeCheck(False, f"{runtime}: {exc.message}")
            except asyncio.CancelledError:
                cancel.set()  # the build's thread kills its compilers and ends
                raise
            log.info("%s: built %s", runtime, found)
        if found is None:
            where = f"[runtimes.{runtime}] server = {configured}: not found" if configured else \
                f"{server.name} is neither on PATH nor built in {self.server_cache.root}"
            return RuntimeCheck(False, f"{runtime} is not installed: {where}; run `infernode runtimes build {runtime}` "
                                       f"or set [runtimes.{runtime}] server in appliance.toml")
        self.servers[runtime] = str(found)
        return None

    async def check_runtime(self, runtime: str, model: ModelConfig | None = None, *, build: bool = True) -> RuntimeCheck:
        """Is a runtime installed where the config says? (cached; runs its version command).

        A runtime whose server the node can build is built here when missing, unless `build` is False.
        """
        if runtime in self.runtime_checks:
            return self.runtime_checks[runtime]
        if not runtimes.launched(runtime):
            return RuntimeCheck(True, "not launched by the node")
        server = runtimes.server_binary(runtime)
        if server is not None:
            failed = await self._find_server(runtime, server, build)
            if failed is not None:
                if build:
                    self.runtime_checks[runtime] = failed
                return failed
        spec = WorkerSpec(model="probe", replica=0, runtime=runtime, port=0, python=self._python(runtime),
                          binary=self._binary(runtime))
        argv = runtimes.get(runtime).version_argv(spec)
        exe = argv[0] if argv else runtime
        missing = not argv or (shutil.which(exe) is None if not Path(exe).is_absolute() else not os.access(exe, os.X_OK))
        if missing:
            check = RuntimeCheck(False, f"{runtime} is not installed: {exe} not found; "
                                        f"install it or set [runtimes.{runtime}] {'server' if server else 'python/binary'} in appliance.toml")
        else:
            try:
                proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.STDOUT)
                out, _ = await asyncio.wait_for(proc.communicate(), 60)
                text = out.decode(errors="replace").strip().splitlines()
                # The line naming the version (a server may print its compiler after it), else the last.
                named = [ln[len("version"):].lstrip(": ") for ln in text if ln.lower().startswith("version")]
                if proc.returncode == 0:
                    check = RuntimeCheck(True, (named or text or ["installed"])[-1])
                else:
                    check = RuntimeCheck(False, f"{runtime} is not installed in {argv[0]}: {text[-1] if text else proc.returncode}")
            except (TimeoutError, OSError) as exc:
                check = RuntimeCheck(False, f"{runtime} is not usable: {exc}")
        self.runtime_checks[runtime] = check
        return check

    async def _prepare(self, placed: Placed) -> WorkerSpec | str:
        """The worker spec for a placed replica, or why it cannot start."""
        m = placed.model
        rs = self.config.runtime_settings(m.runtime)
        model_path = None
        if m.launched:
            if m.name in self._store_problems:
                return self._store_problems[m.name]
            entry = self.lock.entry(m.name)
            assert entry is not None  # stale models are held before this
            model_path = self.store.model_path(entry, runtimes.get(m.runtime).LAYOUT)
            check = await self.check_runtime(m.runtime, m)
            if not check.ok:
                return check.detail
        api_key = None
        if m.api_key_env:
            api_key = os.environ.get(m.api_key_env, "").strip()
            if not api_key:
                return f"${m.api_key_env} (api_key_env of model '{m.name}') is not set; export the key for {m.url}"
        spec = WorkerSpec(
            model=m.name, replica=placed.replica, runtime=m.runtime, port=0, api_key=api_key,
            model_path=model_path, source=m.source, registry=m.registry, gpu_uuids=placed.gpu_uuids,
            gpu_memory_fraction=placed.gpu_memory_fraction, args=tuple(m.args), env={**rs.env, **m.env},
            # The node's own interpreter is no part of a worker that runs none (it changes with every upgrade,
            # and a changed spec is not adopted).
            python=self._python(m.runtime) if runtimes.runs_python(m.runtime) else WorkerSpec.python,
            binary=self._binary(m.runtime), max_model_len=m.max_model_len, url=m.url,
            startup_timeout_s=m.startup_timeout_s or rs.startup_timeout_s, sleep=m.sleep,
            concurrency=m.concurrency,
        )
        try:  # an adapter refuses a spec it cannot launch (e.g. `args` for ollama): say so, don't crash
            runtimes.get(m.runtime).plan(spec)
        except ValueError as exc:
            return f"{m.runtime} cannot launch {m.name}: {exc}"
        return spec

    async def verify_store(self) -> None:
        """Re-hash every locked model before launch; a bad one is held, the others start."""
        self._store_problems = {}
        for m in self.config.models:
            entry = self.lock.entry(m.name)
            if not m.launched or entry is None:
                continue
            problems = await asyncio.to_thread(self.store.verify, entry)
            if problems:
                reason = "store does not match models.lock: " + "; ".join(map(str, problems[:3]))
                self._store_problems[m.name] = reason
                log.error("%s: %s", m.name, reason)

    # -- reconciling -------------------------------------------------------------
    def _new_replica(self, spec: WorkerSpec, adopt=None) -> Replica:
        model = self.config.model(spec.model)
        on_demand = bool(model and model.on_demand)
        cls = OnDemandReplica if on_demand else Replica
        r = cls(spec=spec, settings=self.config.supervisor, run_dir=self.run_dir, log_dir=self.log_dir,
                probe_client=self.probe_client, on_change=self._changed, adopt=adopt,
                adopt_grace_s=self.config.node.adopt_grace_s,
                probe_inference=bool(model and model.probe_inference))
        if isinstance(r, OnDemandReplica):
            assert model is not None
            r.idle_unload_s, r.load_timeout_s = model.idle_unload_s, self.config.node.load_timeout_s
            r.clock = self.clock
            r.last_used = self.clock()
        return r

    @staticmethod
    def _base_hash(r: Replica) -> str:
        """The spec's hash without where an on-demand replica was placed when it loaded."""
        if not isinstance(r, OnDemandReplica):
            return r.hash
        return spec_hash(replace(r.spec, gpu_uuids=(), gpu_memory_fraction=None))

    async def reload(self, config: Config, lock: LockFile) -> dict[str, list[str]]:
        """Take a new config and lock; restart only the replicas whose spec changed."""
        self.config, self.lock = config, lock
        self.runtime_checks = {}  # a runtime may have been installed since
        await self.verify_store()
        return await self.reconcile()

    def _held(self, model: ModelConfig, replica: int, state: WorkerState, reason: str) -> Replica:
        spec = WorkerSpec(model=model.name, replica=replica, runtime=model.runtime, port=0)
        r = self._new_replica(spec)
        r.hold(state, reason)
        return r

    async def reconcile(self, *, adopt: bool = False) -> dict[str, list[str]]:
        """Make the running replicas match the desired ones (only changed ones restart).

        Returns the replica ids by what happened to them: started (new or changed),
        stopped (no longer wanted), unchanged, held (pending/failed with a reason)."""
        self.router.set_models(m.name for m in self.config.models)
        stale = stale_models(self.config, self.lock)
        placement = place(self.config, self.lock, self.inventory)
        adoptable = find_adoptable(self.run_dir) if adopt else {}
        if adopt:
            self._claim_workers()
        desired: dict[str, Replica] = {}
        for p in placement.placed:
            rid = f"{p.model.name}-{p.replica}"
            if p.model.name in stale:
                desired[rid] = self._held(p.model, p.replica, S.FAILED, stale[p.model.name])
                continue
            spec = await self._prepare(p)
            if isinstance(spec, str):
                desired[rid] = self._held(p.model, p.replica, S.FAILED, spec)
                continue
            current = self.replicas.get(rid)
            fresh = self._new_replica(spec)
            if (current is not None and type(current) is type(fresh) and current.state is not S.FAILED
                    and self._base_hash(current) == self._base_hash(fresh)):
                if isinstance(current, OnDemandReplica) and isinstance(fresh, OnDemandReplica):
                    current.idle_unload_s, current.load_timeout_s = fresh.idle_unload_s, fresh.load_timeout_s
                desired[rid] = current
                continue
            found = adoptable.pop(rid, None)
            replica = fresh
            replica.need_bytes = p.need_bytes
            if found is not None and isinstance(replica, OnDemandReplica):  # rebuild where it was placed
                replica.place(found.gpu_uuids, found.gpu_memory_fraction, found.need_bytes)
            if found is not None and found.spec_hash == replica.hash:
                replica.adopt = found
                log.info("adopting %s (pid %s, port %s)", rid, found.keeper_pid, found.port)
            elif found is not None:
                log.info("not adopting %s: its spec changed since it was started; replacing it", rid)
                await self._stop_orphan(found.keeper_pid)
            desired[rid] = replica
        for u in placement.unplaced:
            desired[f"{u.model.name}-{u.replica}"] = self._held(u.model, u.replica, S.PENDING, u.reason)
        for found in adoptable.values():  # left by an earlier node, no longer wanted
            await self._stop_orphan(found.keeper_pid)
        old = self.replicas
        self.replicas = desired
        stops = [r.stop() for rid, r in old.items() if desired.get(rid) is not r]
        await asyncio.gather(*stops)
        summary: dict[str, list[str]] = {"started": [], "stopped": [], "unchanged": [], "held": []}
        for rid, r in desired.items():
            if r.held:
                summary["held"].append(rid)
            elif r.started:
                summary["unchanged"].append(rid)
            else:
                r.start()
                summary["started"].append(rid)
        summary["stopped"] = sorted(rid for rid in old if rid not in desired)
        self._refresh_router()
        return summary

    def _claim_workers(self) -> None:
        """Tell every keeper left by an earlier node that this node owns it now."""
        claim_workers(self.run_dir, owner_token())

    async def _stop_orphan(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.supervisor.stop_timeout_s + 5
        while process_start_time(pid) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def _changed(self, replica: Replica) -> None:
        if self.replicas.get(replica.id) is replica:
            self._refresh_router(replica.spec.model)
        self.on_change_hook(replica)

    def _refresh_router(self, model: str | None = None) -> None:
        models = [model] if model else [m.name for m in self.config.models]
        for name in models:
            ready = [r for r in self.replicas.values() if r.spec.model == name and r.state is S.READY]
            self.router.set_ready(name, ready)
            for r in ready:
                if r.plan is not None and r.plan.context_length is not None:
                    self.router.context[name] = r.plan.context_length

    # -- queries and commands --------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        """(every configured model has a ready replica, reasons for those that do not)."""
        reasons = []
        for m in self.config.models:
            if m.replicas == 0:
                continue
            reps = [r for r in self.replicas.values() if r.spec.model == m.name]
            if any(r.state is S.READY for r in reps):
                continue
            if m.on_demand and self.loadable(m.name):  # ready to be loaded when asked
                continue
            detail = "; ".join(f"replica {r.spec.replica} {r.state.value}" + (f": {r.last_error.splitlines()[0]}" if r.last_error else "")
                               for r in reps) or "no replica"
            reasons.append(f"{m.name}: {detail}")
        return not reasons, reasons

    def loadable(self, name: str) -> bool:
        """Whether an on-demand model can be loaded when asked (a replica neither held nor failed)."""
        return any(isinstance(r, OnDemandReplica) and not r.held and r.state is not S.FAILED
                   for r in self.replicas.values() if r.spec.model == name)

    def restart_model(self, name: str) -> int:
        n = 0
        for r in self.replicas.values():
            if r.spec.model == name:
                if r.held or (isinstance(r, OnDemandReplica) and not r.resident):
                    continue
                r.restart()
                n += 1
        return n

    async def stop_all(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.replicas.values()))
        self._refresh_router()

    async def detach_all(self) -> None:
        """Leave the workers running for a successor node to adopt."""
        await asyncio.gather(*(r.detach() for r in self.replicas.values()))
