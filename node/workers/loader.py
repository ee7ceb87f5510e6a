"""Loading on-demand models: one load per model at a time, room made by evicting the
least recently used on-demand models that have nothing in flight.

`Loader.ensure_loaded(model)` is the service the gateway awaits when an on-demand model
has no ready replica: it joins the load under way or starts one, and returns once a
replica is ready, or raises `NoReadyReplica` (503 `model_not_ready`, Retry-After) with
the reason. Decisions (what is loaded, what fits, what to evict) are taken one at a
time under a lock; the loads themselves run in the replicas' own tasks, so a caller
that gives up cancels nothing but its own wait.

What fits: `[node] max_loaded_models` (every model with a replica up counts, always
and on-demand alike) and GPU memory as placement sees it at that moment: always
replicas, loaded on-demand ones, sleeping ones (their CUDA context), and memory NVML
says other processes hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from node.config import ModelConfig
from node.errors import InvalidRequest, ModelNotFound, NoReadyReplica
from node.workers.gpus import Inventory
from node.workers.handles import session_pids
from node.workers.ondemand import OnDemandReplica
from node.workers.placement import (
    CUDA_OVERHEAD,
    Placed,
    Resident,
    foreign_use,
    place_on_demand,
)
from node.workers.states import WorkerState

log = logging.getLogger("infernode.loader")
S = WorkerState
BUSY_WAIT_S = 2.0          # how long a load waits for a busy model to finish before refusing
POLL_S = 0.05
RETRY_BUSY_S = 5           # Retry-After when the models in the way are busy
RETRY_NO_ROOM_S = 30       # Retry-After when nothing could be evicted at all
_UP = (S.STARTING, S.READY, S.UNHEALTHY, S.RESTARTING, S.LOADING)


def _noop(*_: object) -> None:
    return None


class Loader:
    """Loads and unloads on-demand models of a supervisor (see module doc)."""

    def __init__(self, supervisor, *, read_gpus: Callable[[], Inventory], busy: Callable[[str], bool] = lambda m: False,
                 on_load: Callable[[str, str], None] = _noop, on_loaded: Callable[[str, float], None] = _noop,
                 on_evict: Callable[[str], None] = _noop, busy_wait_s: float = BUSY_WAIT_S) -> None:
        self.sup = supervisor
        self.read_gpus = read_gpus
        self.busy = busy
        self.on_load, self.on_loaded, self.on_evict = on_load, on_loaded, on_evict
        self.busy_wait_s = busy_wait_s
        self._lock = asyncio.Lock()

    # -- what is there ---------------------------------------------------------
    def _model(self, name: str) -> ModelConfig:
        m = self.sup.config.model(name)
        if m is None:
            raise ModelNotFound(f"no model named '{name}'")
        return m

    def _replicas(self, name: str) -> list[OnDemandReplica]:
        return [r for r in self.sup.replicas.values() if r.spec.model == name and isinstance(r, OnDemandReplica)
                and not r.held]

    def _loaded_models(self) -> set[str]:
        """Models with a replica up (or coming up) now."""
        out = set()
        for r in self.sup.replicas.values():
            if r.held:
                continue
            if (r.resident if isinstance(r, OnDemandReplica) else r.state in _UP):
                out.add(r.spec.model)
        return out

    def _in_use(self, name: str) -> bool:
        return self.busy(name) or any(r.inflight for r in self._replicas(name))

    def _last_used(self, name: str) -> float:
        return max((r.last_used for r in self._replicas(name)), default=0.0)

    # -- loading ---------------------------------------------------------------
    async def ensure_loaded(self, model: str, reason: str = "request") -> None:
        """Return once `model` has a ready replica (starting or joining its load); else NoReadyReplica."""
        m = self._model(model)
        if not m.on_demand:
            raise NoReadyReplica(f"model '{model}' has no ready replica yet", retry_after=5)
        reps = self._replicas(model)
        if not reps:
            held = [r for r in self.sup.replicas.values() if r.spec.model == model]
            why = held[0].last_error.splitlines()[0] if held and held[0].last_error else "no replica"
            raise NoReadyReplica(f"model '{model}' cannot be loaded: {why}", retry_after=RETRY_NO_ROOM_S)
        if any(r.state is S.READY for r in reps):
            return
        futs = self._pending(reps)
        if not futs:
            # The decision and the load's start run in a task of their own: a client that gives
            # up (its request task cancelled) must not cut an eviction or a load short.
            decision = asyncio.ensure_future(self._decide(m, reps, reason))
            decision.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved when orphaned
            futs = await asyncio.shield(decision)
            if not futs:
                return
        await self._wait(m, futs)

    async def _decide(self, m: ModelConfig, reps: list[OnDemandReplica], reason: str) -> list[asyncio.Future[str]]:
        """Join the load under way or start one (decisions one at a time); [] when already ready."""
        async with self._lock:
            if any(r.state is S.READY for r in reps):
                return []
            return self._pending(reps) or await self._start_load(m, reps, reason)

    @staticmethod
    def _pending(reps: list[OnDemandReplica]) -> list[asyncio.Future[str]]:
        return [r.load_future for r in reps if r.load_future is not None and not r.load_future.done()]

    async def _start_load(self, m: ModelConfig, reps: list[OnDemandReplica], reason: str) -> list[asyncio.Future[str]]:
        failed = [r for r in reps if r.state is S.FAILED]
        if failed and reason == "request":
            why = failed[0].last_error.splitlines()[0]
            raise NoReadyReplica(f"model '{m.name}' failed to load ({why}); an operator can retry with "
                                 f"`infernode load {m.name}`", retry_after=RETRY_NO_ROOM_S, cures_soon=False)
        placed = await self._make_room(m, reps)
        for r, p in zip(reps, placed):
            if not r.sleeping:  # a sleeper wakes where it is
                r.place(p.gpu_uuids, p.gpu_memory_fraction, p.need_bytes)
        log.info("loading %s (%s)", m.name, reason)
        self.on_load(m.name, reason)
        futs = [r.request_load() for r in reps]
        asyncio.get_running_loop().create_task(self._observe(m.name, futs, time.monotonic()))
        return futs

    async def _wait(self, m: ModelConfig, futs: list[asyncio.Future[str]]) -> None:
        """Until one replica is ready; its own wait only (shared futures are never cancelled here)."""
        deadline = time.monotonic() + self.sup.config.node.load_timeout_s + 5
        pending = set(futs)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise NoReadyReplica(f"model '{m.name}' did not load within {self.sup.config.node.load_timeout_s:g}s",
                                     retry_after=RETRY_BUSY_S)
            if any(f.result() == "" for f in done):
                return
        why = next(f.result() for f in futs if f.result())
        raise NoReadyReplica(f"model '{m.name}' could not be loaded: {why.splitlines()[0]}", retry_after=RETRY_BUSY_S)

    async def _observe(self, model: str, futs: list[asyncio.Future[str]], t0: float) -> None:
        pending = set(futs)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(f.result() == "" for f in done):
                seconds = time.monotonic() - t0
                log.info("%s loaded in %.2fs", model, seconds)
                self.on_loaded(model, seconds)
                return

    # -- making room -------------------------------------------------------------
    async def _make_room(self, m: ModelConfig, reps: list[OnDemandReplica]) -> tuple[Placed, ...]:
        """Evict least recently used idle on-demand models until m fits; NoReadyReplica if it cannot."""
        give_up = time.monotonic() + self.busy_wait_s
        first = True
        while True:
            placed, why = await self._fit(m, reps)
            if placed is not None:
                return placed
            evictable = {v for v in self._loaded_models() - {m.name} if self._model(v).on_demand}
            if first and (await self._fit(m, reps, ignore=evictable))[0] is None:
                # Not even with every on-demand model unloaded: refuse without unloading any.
                raise NoReadyReplica(f"cannot load '{m.name}': {why}, even with every other on-demand model "
                                     "unloaded", retry_after=RETRY_NO_ROOM_S, cures_soon=False)
            first = False
            victims = [v for v in evictable if all(r.state is not S.LOADING for r in self._replicas(v))]
            idle = [v for v in victims if not self._in_use(v)]
            if idle:
                victim = min(idle, key=self._last_used)
                log.info("evicting %s to load %s (%s)", victim, m.name, why)
                await self.unload(victim)
                self.on_evict(victim)
                continue
            if victims and time.monotonic() < give_up:  # e.g. a stream still draining: give it a moment
                await asyncio.sleep(POLL_S)
                continue
            if victims:
                raise NoReadyReplica(f"cannot load '{m.name}' now: {why}, and every loaded on-demand model has "
                                     "requests in flight", retry_after=RETRY_BUSY_S)
            raise NoReadyReplica(f"cannot load '{m.name}': {why}, and no on-demand model can be unloaded "
                                 "to make room", retry_after=RETRY_NO_ROOM_S)

    async def _fit(self, m: ModelConfig, reps: list[OnDemandReplica],
                   ignore: frozenset[str] | set[str] = frozenset()) -> tuple[tuple[Placed, ...] | None, str]:
        """Where m would run now (as if the models in `ignore` were unloaded), or why it does not fit."""
        loaded = self._loaded_models() - {m.name} - ignore
        limit = self.sup.config.node.max_loaded_models
        if limit is not None and len(loaded) >= limit:
            return None, f"max_loaded_models = {limit} and {', '.join(sorted(loaded))} loaded"
        if m.gpu_count == 0:
            return tuple(Placed(m, r.spec.replica) for r in reps), ""
        residents: list[tuple[Resident, str]] = []
        leaders: set[int] = set()
        for r in self.sup.replicas.values():
            if r.worker_pid:
                leaders.add(r.worker_pid)
            if r.spec.model == m.name or r.held or not r.spec.gpu_uuids:
                continue
            if isinstance(r, OnDemandReplica):
                if r.resident:
                    residents.append((Resident(r.spec.gpu_uuids, r.need_bytes), r.spec.model))
                elif r.sleeping:  # weights in CPU memory; the CUDA context stays
                    residents.append((Resident(r.spec.gpu_uuids, CUDA_OVERHEAD), r.spec.model))
            elif r.state is not S.STOPPED:
                residents.append((Resident(r.spec.gpu_uuids, r.need_bytes), r.spec.model))
        inventory = await asyncio.to_thread(self.read_gpus)
        own = await asyncio.to_thread(session_pids, leaders)
        foreign = foreign_use(inventory, own, [res for res, _ in residents])
        target = m
        if all(r.sleeping for r in reps) and reps[0].spec.gpu_uuids:  # it wakes on the GPUs it sleeps on
            target = m.model_copy(update={"gpus": list(reps[0].spec.gpu_uuids)})
        staying = [res for res, model in residents if model not in ignore]
        placed = place_on_demand(target, self.sup.lock, inventory, staying, foreign)
        if isinstance(placed, str):
            return None, f"GPU memory: {placed}"
        return placed, ""

    # -- commands ------------------------------------------------------------------
    async def load(self, model: str, reason: str = "admin") -> float:
        """Load a model now (an operator's `load`; it also leaves `failed`); the seconds it took."""
        m = self._model(model)
        if not m.on_demand:
            raise InvalidRequest(f"model '{model}' is loaded at start (load = \"always\"); restart it instead",
                                 code="model_always_loaded")
        t0 = time.monotonic()
        await self.ensure_loaded(model, reason)
        return time.monotonic() - t0

    async def unload(self, model: str) -> int:
        """Unload (or put to sleep) every replica of an on-demand model; how many were up."""
        m = self._model(model)
        if not m.on_demand:
            raise InvalidRequest(f"model '{model}' is loaded at start (load = \"always\") and is never unloaded",
                                 code="model_always_loaded")
        reps = [r for r in self._replicas(model) if r.resident]
        await asyncio.gather(*(r.request_unload() for r in reps))
        return len(reps)

    def loadable(self, model: str) -> bool:
        """Whether an on-demand model can be loaded when asked (not held, not failed)."""
        return any(r.state is not S.FAILED for r in self._replicas(model))
