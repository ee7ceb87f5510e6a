"""An on-demand replica: loaded when asked, unloaded (or put to sleep) when idle.

Like every replica, one task owns its process and state (`OnDemandReplica.run`);
others only ask: `request_load()` and `request_unload()` return futures that the task
resolves, so any number of callers share one load, and a caller that gives up
cancels nothing but its own wait. A load is idempotent in every state: ready answers
at once, loading joins the load under way, unloaded (or asleep) starts one.

    unloaded --load--> loading --ready--> ready --idle/unload--> stopping --> unloaded

A worker whose runtime has a sleep mode (the adapter says so in the plan) is put to
sleep instead of stopped and woken on the next load; it stays `unloaded` meanwhile,
with `sleeping` set. Failed loads go back to `unloaded` with the reason; after
`crash_loop_limit` failures in a row the replica is `failed` until an operator loads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import httpx

from node.workers.replica import Replica, ReplicaStatus, spec_hash
from node.workers.states import WorkerState

S = WorkerState
IDLE_TICK_S = 1.0       # how often an idle timer is looked at


class OnDemandReplica(Replica):
    """A replica with no process until a load is asked for."""

    idle_unload_s: float = 900.0
    load_timeout_s: float = 600.0
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._load = asyncio.Event()
        self._unload = asyncio.Event()
        self.load_future: asyncio.Future[str] | None = None
        self._unloaded: list[asyncio.Future[None]] = []
        self.sleeping = False
        self.failed_loads = 0
        self.last_used = self.clock()
        self.load_started: float | None = None
        self.last_load_s: float | None = None

    # Each request's start and end is a use, which is all the idle timer and LRU eviction need
    # (no extra hot-path call).
    def begin(self) -> None:
        super().begin()
        self.last_used = self.clock()

    def end(self) -> None:
        super().end()
        self.last_used = self.clock()

    # -- requests from outside -------------------------------------------------
    def request_load(self) -> asyncio.Future[str]:
        """A future of the load's outcome ('' when ready, else why not); starts one unless one runs."""
        fut = self.load_future
        if fut is None or fut.done():
            fut = self.load_future = asyncio.get_running_loop().create_future()
            if self.state is S.READY:
                fut.set_result("")
                return fut
            self.last_used = self.clock()
            self._unload.clear()
            self._load.set()
        self.start()
        return fut

    def request_unload(self) -> asyncio.Future[None]:
        """A future done once the worker is unloaded (or asleep)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.state in (S.UNLOADED, S.FAILED, S.STOPPED, S.PENDING) and not self._load.is_set():
            fut.set_result(None)
            return fut
        self._unloaded.append(fut)
        self._load.clear()
        self._unload.set()
        return fut

    @property
    def resident(self) -> bool:
        """Whether it holds (or is about to hold) its GPU memory in full."""
        return self.state in (S.LOADING, S.READY, S.UNHEALTHY) or self._load.is_set()

    def idle_for(self) -> float:
        return max(0.0, self.clock() - self.last_used)

    def status(self) -> ReplicaStatus:
        st = super().status()
        st.load, st.sleeping = "on_demand", self.sleeping
        st.idle_s = round(self.idle_for(), 1)
        return st

    # -- the owning task -------------------------------------------------------
    def _interrupt(self) -> str:
        if self._stop.is_set() or self._restart.is_set():
            return "stop requested"
        if self._unload.is_set():
            return "unload requested"
        if (self.state is S.READY and self.idle_unload_s > 0 and self._inflight == 0
                and self.idle_for() >= self.idle_unload_s):
            return f"idle for {self.idle_unload_s:g}s"
        return ""

    def _wakers(self) -> list[asyncio.Event]:
        return [self._stop, self._restart, self._unload]

    def _tick_s(self) -> float:
        return min(self.settings.probe_interval_s, IDLE_TICK_S)

    async def run(self) -> None:
        """Wait for a load, load, serve until idle or asked to unload; repeat until stopped."""
        try:
            ready = False
            if self.adopt is not None:
                ready = await self._adopt_existing()
            elif self.state is not S.UNLOADED:
                self._set(S.UNLOADED)
            while not self._stop.is_set():
                if not ready:
                    await self._wait_any(self._stop, self._load, self._restart)
                    if self._stop.is_set():
                        break
                    self._restart.clear()
                    self._load.clear()
                    why = await self._bring_up()
                    if self._stop.is_set():
                        break
                    if why:
                        await self._down(why, failed=why != "stop requested")
                        continue
                ready = False
                why = await self._watch()
                if self._stop.is_set():
                    break
                restart = self._restart.is_set()
                await self._down(why, failed=why not in ("unload requested", "stop requested") and not why.startswith("idle"))
                if restart:
                    self._load.set()
        finally:
            self._resolve_load("the node is stopping")
            if self._detaching:
                pass
            elif self.state is S.PENDING or (self.state in (S.UNLOADED, S.FAILED) and self.keeper is None):
                self._set(S.STOPPED)
            elif self.state is not S.STOPPED:
                if self.state is not S.STOPPING:
                    self._set(S.STOPPING)
                await self._terminate()
                self._set(S.STOPPED)
            self._resolve_unloads()

    async def _bring_up(self) -> str:
        """Wake the sleeping worker or start one; READY and '' when it serves, else why not."""
        self.load_started = time.monotonic()
        self._set(S.LOADING)
        assert self.plan is not None or not self.sleeping
        if self.sleeping and self.keeper is not None and self.keeper.alive():
            why = await self._call_sleep_control(wake=True)
            self.sleeping = False
            if not why:
                why = await self._await_ready(self.load_timeout_s)
        else:
            self.sleeping = False
            if self.keeper is not None:  # a sleeper that died meanwhile
                await self._terminate()
            self._launch()
            why = await self._await_ready(self.load_timeout_s) or await self._warm_up()
        if why:
            return why
        self.failed_loads = 0
        self.last_load_s = time.monotonic() - self.load_started
        self.last_used = self.clock()
        self._set(S.READY, "")
        self._resolve_load("")
        return ""

    async def _down(self, why: str, *, failed: bool) -> None:
        """Unload (or put to sleep) after a life ended for `why`; a failure is remembered."""
        self._set(S.STOPPING)
        slept = False
        if not failed and self.plan is not None and self.plan.sleep is not None and self.keeper is not None \
                and self.keeper.alive():
            problem = await self._call_sleep_control(wake=False)
            slept = not problem
            if problem:
                why = f"{why}; sleep failed ({problem}), stopped instead"
        if not slept:
            await self._terminate()
        self.sleeping = slept
        self._resolve_load(why or "unloaded")  # a load cut short by an unload ends for its waiters too
        if failed:
            self.failed_loads += 1
            self._resolve_load(why)
            if self.failed_loads >= self.settings.crash_loop_limit:
                self._set(S.UNLOADED, why)
                self._set(S.FAILED, f"{self.failed_loads} loads failed in a row: {why}")
                self._resolve_unloads()
                return
        self._set(S.UNLOADED, why if failed else "")
        self._resolve_unloads()

    async def _adopt_existing(self) -> bool:
        """Take over a worker an earlier node left: ready (True) or asleep as it was."""
        self.load_started = time.monotonic()
        self._launch()
        self._set(S.LOADING)
        why = await self._await_ready(self.load_timeout_s)
        if not why and self.plan is not None and self.plan.sleep is not None and await self._asleep():
            self.sleeping = True
            self._set(S.STOPPING)
            self._set(S.UNLOADED)
            return False
        if why:
            await self._down(why, failed=True)
            return False
        self.last_used = self.clock()  # the idle timer starts again from the adoption
        self._set(S.READY, "")
        return True

    def place(self, gpu_uuids: tuple[str, ...], fraction: float | None, need_bytes: int) -> None:
        """Where the next load runs (placement decides it at load time)."""
        self.spec = replace(self.spec, gpu_uuids=gpu_uuids, gpu_memory_fraction=fraction)
        self.hash = spec_hash(self.spec)
        self.need_bytes = need_bytes

    async def _asleep(self) -> bool:
        assert self.plan is not None and self.plan.sleep is not None
        try:
            r = await self.probe_client.get(self.plan.root_url + self.plan.sleep.is_sleeping,
                                            timeout=self.settings.probe_timeout_s)
            return bool(r.status_code == 200 and r.json().get("is_sleeping"))
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    async def _call_sleep_control(self, *, wake: bool) -> str:
        """Send the plan's sleep or wake request; '' when it worked."""
        assert self.plan is not None and self.plan.sleep is not None
        method, path = self.plan.sleep.wake if wake else self.plan.sleep.sleep
        timeout = self.load_timeout_s if wake else self.settings.stop_timeout_s + 60
        try:
            r = await self.probe_client.request(method, self.plan.root_url + path, timeout=timeout)
        except httpx.HTTPError as exc:
            return f"{path}: {type(exc).__name__}"
        return "" if r.status_code == 200 else f"{path}: HTTP {r.status_code}"

    def _resolve_load(self, outcome: str) -> None:
        fut = self.load_future
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def _resolve_unloads(self) -> None:
        waiting, self._unloaded = self._unloaded, []
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)
