"""The scheduler in-process: replica slots, fair hand-over, bounded waiting, tenancy and its metrics."""

from __future__ import annotations

import asyncio
import functools
import types
from dataclasses import dataclass

import pytest

from node.accounts.keys import KeyRecord
from node.accounts.plans import PlanRecord
from node.accounts.quotas import Quotas
from node.accounts.teams import TeamRecord
from node.gateway import scheduler as scheduler_module
from node.gateway.fairqueue import Priority
from node.gateway.scheduler import ModelQueue, QueueFull, QueueTimeout, Scheduler, cost
from node.gateway.tenancy import Tenancy
from node.ops.metrics import Metrics
from node.workers.router import Router


def run(fn):
    """Run an async test on a fresh event loop."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        return asyncio.run(fn(*args, **kw))
    return wrapper


@dataclass(eq=False)
class Replica:
    id: str
    slots: int
    inflight: int = 0

    @property
    def openai_base(self) -> str:
        return "http://127.0.0.1:1/v1"


def key(kid: str, team: str | None = None, **kw) -> KeyRecord:
    return KeyRecord(id=kid, name=kid, secret_hash=kid, prefix=kid, team=team, **kw)


def setup(*slots: int, max_queue: int = 100, timeout: float = 30.0, max_queued: int | None = None,
          metrics: Metrics | None = None, batch_yield_s: float = 0.5,
          batch_min_share: float = 0.1) -> tuple[Router, ModelQueue, list[Replica]]:
    router = Router(["m"])
    reps = [Replica(f"m/{i}", n) for i, n in enumerate(slots)]
    router.set_ready("m", reps)
    sched = Scheduler(router, slots_of=lambda t: t.slots, metrics=metrics, batch_yield_s=batch_yield_s,
                      batch_min_share=batch_min_share)
    q = sched.set_models({"m": (64, max_queue, timeout, max_queued)})["m"]
    return router, q, reps


BODY = {"max_tokens": 16}
T = Tenancy()


async def enter(q: ModelQueue, k: KeyRecord, body: dict = BODY, lower: bool = False):
    return await q.enter(k, T, body, 100, lower)


@run
async def test_free_slots_are_taken_at_once_on_the_least_busy_replica():
    _, q, (r0, r1) = setup(2, 1)
    a = await enter(q, key("a"))
    b = await enter(q, key("a"))
    c = await enter(q, key("a"))
    assert [s.target for s in (a, b, c)] == [r0, r1, r0]
    assert q.held == {"m/0": 2, "m/1": 1} and q.inflight == 3 and q.queued == 0
    a.leave(0.1)
    assert q.held == {"m/0": 1, "m/1": 1}


@run
async def test_a_full_model_queues_and_a_release_hands_over_in_fair_order():
    _, q, (r0,) = setup(1)
    held = await enter(q, key("noisy"))
    noisy = [asyncio.create_task(enter(q, key("noisy"), {"max_tokens": 256})) for _ in range(5)]
    await asyncio.sleep(0)
    quiet = asyncio.create_task(enter(q, key("quiet")))
    await asyncio.sleep(0)
    assert q.queued == 6
    held.leave(0.1)  # the slot goes to one noisy waiter (the first stamped)...
    first = await asyncio.wait_for(asyncio.shield(noisy[0]), 1)
    first.leave(0.1)  # ...and the next to the quiet tenant, ahead of noisy's backlog
    slot = await asyncio.wait_for(quiet, 1)
    assert slot.target is r0 and q.queued == 4 and not any(t.done() for t in noisy[1:])
    for t in noisy[1:]:
        t.cancel()
    await asyncio.gather(*noisy[1:], return_exceptions=True)
    assert q.queued == 0


@run
async def test_a_client_that_goes_away_leaves_the_line_at_once():
    _, q, _ = setup(1)
    held = await enter(q, key("a"))
    waiter = asyncio.create_task(enter(q, key("b")))
    await asyncio.sleep(0)
    assert q.queued == 1 and q.fq.tenant_waiting("key:b") == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.queued == 0 and q.fq.tenant_waiting("key:b") == 0
    held.leave(0.1)
    assert q.inflight == 0 and q.held == {"m/0": 0}


@run
async def test_a_slot_handed_over_as_its_waiter_gives_up_is_passed_on():
    _, q, _ = setup(1)
    held = await enter(q, key("a"))
    w1 = asyncio.create_task(enter(q, key("b")))
    w2 = asyncio.create_task(enter(q, key("c")))
    await asyncio.sleep(0)
    held.leave(0.1)   # w1's future gets the slot...
    w1.cancel()       # ...but its client went away before it ran
    with pytest.raises(asyncio.CancelledError):
        await w1
    slot = await asyncio.wait_for(w2, 1)  # the slot went on to w2, not lost
    assert q.inflight == 1 and slot.target is not None


@run
async def test_the_queue_deadline_is_a_503_with_retry_after():
    _, q, _ = setup(1, timeout=0.05)
    await enter(q, key("a"))
    with pytest.raises(QueueFull) as err:
        await enter(q, key("b"))
    assert isinstance(err.value.error, QueueTimeout)
    assert err.value.error.status == 503 and int(err.value.error.headers["retry-after"]) >= 1
    assert q.queued == 0


@run
async def test_a_request_may_be_given_its_own_wait_batch_lines_wait_longer():
    _, q, _ = setup(1, timeout=0.05)
    held = await enter(q, key("a"))
    line = asyncio.create_task(q.enter(key("b"), T, BODY, 100, True, 5.0))
    await asyncio.sleep(0.2)                    # past the model's queue_timeout_s, still waiting
    assert not line.done() and q.queued == 1
    held.leave(0.1)
    assert (await asyncio.wait_for(line, 2)).priority is Priority.BATCH
    with pytest.raises(QueueFull) as err:
        await q.enter(key("c"), T, BODY, 100, False, 0.1)
    assert "waited 0.1 s" in err.value.error.message


@run
async def test_a_tenant_past_max_queued_is_a_429_and_others_still_queue():
    _, q, _ = setup(1, max_queued=2)
    await enter(q, key("a", team="t"))
    waiters = [asyncio.create_task(enter(q, key(f"k{i}", team="t"))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as err:
        await enter(q, key("k9", team="t"))
    assert err.value.error.status == 429 and err.value.error.code == "tenant_queue_full"
    assert "retry-after" in err.value.error.headers
    other = asyncio.create_task(enter(q, key("solo")))
    await asyncio.sleep(0)
    assert q.queued == 3 and not other.done()
    for w in [*waiters, other]:
        w.cancel()
    await asyncio.gather(*waiters, other, return_exceptions=True)


@run
async def test_a_full_model_queue_refuses_at_once():
    _, q, _ = setup(1, max_queue=1)
    await enter(q, key("a"))
    w = asyncio.create_task(enter(q, key("b")))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as err:
        await enter(q, key("c"))
    assert err.value.error is None  # the gateway answers 429 model_overloaded
    w.cancel()
    await asyncio.gather(w, return_exceptions=True)


@run
async def test_a_replica_becoming_ready_wakes_the_waiters():
    router, q, (r0,) = setup(1)
    await enter(q, key("a"))
    w = asyncio.create_task(enter(q, key("b")))
    await asyncio.sleep(0)
    r1 = Replica("m/1", 1)
    router.set_ready("m", [r0, r1])
    slot = await asyncio.wait_for(w, 1)
    assert slot.target is r1


@run
async def test_no_ready_replica_admits_without_a_target():
    router, q, _ = setup()
    slot = await enter(q, key("a"))
    assert slot.target is None  # the gateway then loads on demand or answers 503
    slot.leave(0.0)
    assert q.inflight == 0


@run
async def test_slots_taken_while_loading_get_a_replicas_slots_once_it_is_ready():
    router, q, _ = setup(timeout=0.3)
    early = [await enter(q, key(f"k{i}")) for i in range(4)]      # the model is loading: no replica yet
    assert all(s.target is None for s in early) and q.held == {}
    await q.bind(early[0])                                        # still none ready: routed as before
    assert early[0].target is None
    replica = Replica("m/0", 2)
    router.set_ready("m", [replica])                              # loaded, with 2 slots
    binds = [asyncio.create_task(q.bind(s)) for s in early]
    await asyncio.sleep(0.02)
    assert [b.done() for b in binds] == [True, True, False, False]  # in the order they came
    assert q.held == {"m/0": 2} and early[0].target is replica and early[2].target is None
    late = asyncio.create_task(enter(q, key("later")))             # a request after the load waits behind them
    await asyncio.sleep(0.02)
    early[0].leave(0.1)
    await asyncio.sleep(0.02)
    assert binds[2].done() and early[2].target is replica and not late.done()
    with pytest.raises(QueueTimeout):                             # the fourth's wait is bounded too
        await binds[3]
    early[3].leave(0.0)
    for s in early[1:3]:
        s.leave(0.1)
    assert (await asyncio.wait_for(late, 1)).target is replica
    assert q.held == {"m/0": 1} and q.inflight == 1


@run
async def test_an_interactive_request_preempts_the_batch_lines_taken_while_it_was_quiet():
    _, q, _ = setup(4, batch_yield_s=60, batch_min_share=1.0)   # floor 1.0: one batch slot whenever none runs
    stopped: list[str] = []
    lines = [await enter(q, key("b"), lower=True) for _ in range(2)]   # quiet: batch takes free slots
    for i, s in enumerate(lines):
        q.preemptible(s, functools.partial(stopped.append, f"line{i}"))
    lines[1].leave(0.01)                                # a line that ended is not preempted
    inter = await enter(q, key("i"))
    assert stopped == ["line0"]
    lines[0].leave(0.01)                                # (its request stops and gives the slot back)
    inter.leave(0.01)
    floor = await asyncio.wait_for(enter(q, key("b"), lower=True), 0.5)  # under batch's floor, not quiet
    q.preemptible(floor, functools.partial(stopped.append, "floor"))
    other = await enter(q, key("i"))
    assert stopped == ["line0"]                         # the floor's line is kept
    for s in (floor, other):
        s.leave(0.01)
    assert q.inflight == 0 and not q._preemptible


@run
async def test_batch_waits_behind_interactive():
    _, q, _ = setup(1)
    held = await enter(q, key("x"))
    batch = asyncio.create_task(enter(q, key("b"), lower=True))
    await asyncio.sleep(0)
    inter = asyncio.create_task(enter(q, key("i")))
    await asyncio.sleep(0)
    held.leave(0.1)
    got = await asyncio.wait_for(inter, 1)
    assert got.priority is Priority.INTERACTIVE and not batch.done()
    got.leave(0.1)
    assert (await asyncio.wait_for(batch, 1)).priority is Priority.BATCH


@run
async def test_batch_fills_idle_slots_at_once():
    _, q, _ = setup(4)
    slots = [await asyncio.wait_for(enter(q, key("b"), lower=True), 0.05) for _ in range(4)]
    assert q.batch == 4 and q.fore == 0 and all(s.priority is Priority.BATCH for s in slots)


@run
async def test_batch_yields_free_slots_while_interactive_traffic_runs_and_resumes_after_it():
    _, q, _ = setup(4, batch_yield_s=0.3, batch_min_share=0)
    inter = await enter(q, key("i"))
    batch = asyncio.create_task(enter(q, key("b"), lower=True))
    await asyncio.sleep(0.05)
    assert not batch.done() and q.held == {"m/0": 1}          # three slots free, yet batch waits
    again = await asyncio.wait_for(enter(q, key("i")), 0.05)   # interactive passes the waiting batch at once
    inter.leave(0.01)
    again.leave(0.01)
    left = asyncio.get_running_loop().time()
    await asyncio.sleep(0.2)
    assert not batch.done()                                    # still within batch_yield_s of the last one
    got = await asyncio.wait_for(batch, 1)
    assert got.priority is Priority.BATCH and asyncio.get_running_loop().time() - left >= 0.29
    more = await asyncio.wait_for(enter(q, key("b"), lower=True), 0.05)  # quiet now: the fast path
    assert q.batch == 2 and more.target is not None


@run
async def test_batch_keeps_its_floor_of_slot_time_while_interactive_never_stops(monkeypatch):
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(scheduler_module, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    _, q, _ = setup(4, batch_yield_s=60, batch_min_share=0.2)

    async def interactive_for(seconds: float) -> None:
        s = await enter(q, key("i"))
        clock.now += seconds
        s.leave(seconds)

    steady = await enter(q, key("i"))                     # interactive traffic that never stops
    first, second = (asyncio.create_task(enter(q, key("b"), lower=True)) for _ in range(2))
    await asyncio.sleep(0.02)
    assert not first.done() and not second.done()         # nothing served yet: no floor to keep
    await interactive_for(0.1)                            # 0.1 s of interactive slot time, batch none: under its floor
    got = await asyncio.wait_for(first, 0.5)
    await asyncio.sleep(0.02)
    assert not second.done() and q.batch == 1             # one at a time under the floor
    clock.now += 0.1
    got.leave(30.0)                                       # batch held its slot 0.1 s (not the 30 s it says it took)
    await asyncio.sleep(0.02)
    assert not second.done() and q.batch == 0             # half the slot time: over 0.2
    for _ in range(2):
        await interactive_for(0.1)
    await asyncio.sleep(0.02)
    assert not second.done()                              # 0.1 s of 0.4: still over 0.2
    for _ in range(2):
        await interactive_for(0.1)                        # 0.1 s of 0.6: under it
    assert (await asyncio.wait_for(second, 0.5)).priority is Priority.BATCH
    steady.leave(0.1)


@run
async def test_metrics_show_depth_wait_and_team_slots():
    m = Metrics()
    _, q, _ = setup(1, metrics=m)
    held = await enter(q, key("a", team="red"))
    w = asyncio.create_task(enter(q, key("b", team="blue")))
    await asyncio.sleep(0)
    text = m.render().decode()
    assert 'infernode_queue_depth{model="m",priority="interactive"} 1.0' in text
    assert 'infernode_team_inflight{model="m",team="red"} 1.0' in text
    held.leave(0.1)
    (await asyncio.wait_for(w, 1)).leave(0.1)
    text = m.render().decode()
    assert 'infernode_queue_depth{model="m",priority="interactive"} 0.0' in text
    assert 'infernode_queue_wait_seconds_count{model="m",priority="interactive"} 2.0' in text
    assert 'infernode_team_inflight{model="m",team="red"} 0.0' in text


@run
async def test_team_labels_are_bounded():
    m = Metrics()
    _, q, _ = setup(1000, metrics=m)
    for i in range(60):  # under the model's max_inflight (64)
        await enter(q, key(f"k{i}", team=f"team{i}"))
    text = m.render().decode()
    teams = {line.split('team="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("infernode_team_inflight{")}
    assert len(teams) <= 33 and "other" in teams


def test_tenancy_key_over_team_over_plans():
    qs = Quotas()
    qs.set_teams([TeamRecord("red", share=2.0, plan="gold"), TeamRecord("blue")],
                 {"gold": PlanRecord("gold", share=5.0, priority="batch"), "slow": PlanRecord("slow", priority="batch")})
    t = Tenancy(qs)
    assert t.of(key("k1", team="red")) == ("red", 2.0, Priority.BATCH)           # team's share, team plan's band
    assert t.of(key("k2", team="red", share=3.0, priority="interactive")) == ("red", 3.0, Priority.INTERACTIVE)
    assert t.of(key("k3", team="blue", plan="slow")) == ("blue", 1.0, Priority.BATCH)
    assert t.of(key("k4")) == ("key:k4", 1.0, Priority.INTERACTIVE)
    k5 = key("k5", team="blue")
    assert t.of(k5)[1] == 1.0
    qs.set_teams([TeamRecord("blue", share=4.0)], {})   # a team change reaches cached keys
    assert t.of(k5)[1] == 4.0


@pytest.mark.parametrize("body, size, expected", [
    ({"max_tokens": 100}, 400, 200),
    ({"max_completion_tokens": 10}, 0, 10),
    ({}, 0, 256),
    ({"max_tokens": "x"}, 0, 256),
    ({"max_tokens": True}, 0, 256),
    ({"max_tokens": -5}, 0, 256),
    ({"max_tokens": 10**30}, 0, 1 << 20),
])
def test_cost_is_tokens_asked(body, size, expected):
    assert cost(body, size) == expected
