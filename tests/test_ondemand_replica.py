"""One on-demand replica driven directly, with an injected clock for its idle timer and
the llama.cpp stand-in interpreter: many loads asked at once share one start, the idle
timer unloads only once the clock says so (and never with a request in flight), and
failed loads end in `failed` after crash_loop_limit tries, with the reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from node.config import SupervisorSection
from node.workers.keeper import process_start_time
from node.workers.ondemand import OnDemandReplica
from node.workers.states import TRANSITIONS, WorkerState
from runtimes import WorkerSpec
from tests.conftest import REPO

S = WorkerState
FAKE_SERVER = REPO / "tests" / "fakes" / "llama_server.py"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp: Path, mode: str, seen: list[WorkerState], clock: Clock, idle_unload_s: float = 60) -> OnDemandReplica:
    def changed(r) -> None:
        assert not seen or r.state is seen[-1] or r.state in TRANSITIONS[seen[-1]], (seen[-1], r.state)
        seen.append(r.state)

    spec = WorkerSpec(model="od", replica=0, runtime="llamacpp", port=0, model_path=tmp / "model.gguf",
                      binary=str(FAKE_SERVER), env={"FAKE_LLAMACPP_MODE": mode}, startup_timeout_s=20)
    settings = SupervisorSection(backoff_initial_s=0.2, backoff_max_s=0.8, crash_loop_limit=2, probe_interval_s=0.2,
                                 probe_timeout_s=2, probe_failures=2, stop_timeout_s=3)
    r = OnDemandReplica(spec=spec, settings=settings, run_dir=tmp / "run", log_dir=tmp / "logs",
                        probe_client=httpx.AsyncClient(), on_change=changed, adopt_grace_s=3)
    r.clock = clock  # type: ignore[method-assign]
    r.idle_unload_s, r.load_timeout_s = idle_unload_s, 20
    r.last_used = clock()
    return r


async def until(pred, timeout: float = 20) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return bool(pred())


def test_one_start_for_many_loads_and_idle_unload_by_the_injected_clock(tmp_path: Path) -> None:
    seen: list[WorkerState] = []
    clock = Clock()
    r = make(tmp_path, "serve", seen, clock)

    async def main() -> None:
        r.start()
        assert await until(lambda: r.state is S.UNLOADED)
        futs = [r.request_load() for _ in range(5)]
        assert len({id(f) for f in futs}) == 1  # one load, shared
        assert await asyncio.wait_for(asyncio.shield(futs[0]), 20) == ""
        assert r.state is S.READY and r.request_load().result() == ""  # ready: answered at once
        pid = r.worker_pid
        assert pid and seen.count(S.LOADING) == 1
        # Real time passes, the injected clock does not: still loaded.
        await asyncio.sleep(1.5)
        assert r.state is S.READY
        # A request in flight holds it however long it lasts.
        r.begin()
        clock.now += 3600
        await asyncio.sleep(1.5)
        assert r.state is S.READY
        r.end()  # the request ends: that was a use, the timer starts again
        await asyncio.sleep(1.5)
        assert r.state is S.READY
        clock.now += 61
        assert await until(lambda: r.state is S.UNLOADED, timeout=5)
        assert r.last_error == "" and process_start_time(pid) is None
        await r.stop()
        await r.probe_client.aclose()
        assert r.state is S.STOPPED

    asyncio.run(main())
    assert seen[:4] == [S.UNLOADED, S.LOADING, S.READY, S.STOPPING]


def test_failed_loads_give_the_reason_then_end_in_failed(tmp_path: Path) -> None:
    seen: list[WorkerState] = []
    r = make(tmp_path, "crash", seen, Clock())

    async def main() -> None:
        r.start()
        first = await asyncio.wait_for(r.request_load(), 20)
        assert "worker exited with code 3" in first
        assert r.state is S.UNLOADED and "worker exited with code 3" in r.last_error
        second = await asyncio.wait_for(r.request_load(), 20)
        assert second
        assert await until(lambda: r.state is S.FAILED)
        assert r.last_error.startswith("2 loads failed in a row: worker exited with code 3")
        await r.stop()
        await r.probe_client.aclose()

    asyncio.run(main())
    assert S.FAILED in seen and seen[-1] is S.STOPPED
