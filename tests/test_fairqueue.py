"""The fair queue on its own: order of service between bands, tenants and keys (tables and properties)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.gateway.fairqueue import FairQueue, Priority, Ticket

INT, BAT = Priority.INTERACTIVE, Priority.BATCH


def ticket(tenant: str, key: str = "", prio: Priority = INT, cost: float = 1.0, share: float = 1.0, n: int = 0) -> Ticket:
    return Ticket(tenant, key or tenant, prio, cost, share, float(n), payload=n)


def drain(fq: FairQueue, limit: int | None = None) -> list[Ticket]:
    out = []
    while fq and (limit is None or len(out) < limit):
        t = fq.pop()
        assert t is not None
        out.append(t)
    return out


def names(ts: list[Ticket]) -> str:
    return "".join(t.tenant for t in ts)


@pytest.mark.parametrize("arrivals, expected", [
    # one tenant: first come, first served
    ([("a", 1)] * 3, "aaa"),
    # two tenants, equal costs and shares: they alternate, whoever came first starts
    ([("a", 1)] * 3 + [("b", 1)] * 3, "ababab"),
    # a tenant asking 4x the tokens per request gets a quarter of the requests
    ([("a", 4)] * 2 + [("b", 1)] * 8, "abbbbabbbb"),
])
def test_order_between_tenants(arrivals, expected):
    fq = FairQueue()
    for i, (tenant, cost) in enumerate(arrivals):
        fq.push(ticket(tenant, cost=cost, n=i))
    assert names(drain(fq)) == expected


def test_shares_weigh_the_order():
    fq = FairQueue()
    for i in range(40):
        fq.push(ticket("big", share=3.0, n=i))
        fq.push(ticket("small", share=1.0, n=i))
    first = Counter(t.tenant for t in drain(fq, 20))
    assert first == {"big": 15, "small": 5}


def test_round_robin_between_a_tenants_keys_and_fifo_within_a_key():
    fq = FairQueue()
    for i in range(3):
        fq.push(ticket("team", key="k1", n=i))
    for i in range(3, 5):
        fq.push(ticket("team", key="k2", n=i))
    order = [(t.key, t.payload) for t in drain(fq)]
    assert order == [("k1", 0), ("k2", 3), ("k1", 1), ("k2", 4), ("k1", 2)]


def test_a_newcomer_does_not_wait_behind_a_backlog():
    """A quiet tenant arriving while a noisy one has 16 queued goes next (the issue's case)."""
    fq = FairQueue()
    for i in range(16):
        fq.push(ticket("noisy", cost=256, n=i))
    assert fq.pop().tenant == "noisy"  # in service
    fq.push(ticket("quiet", cost=16, n=99))
    assert fq.pop().tenant == "quiet"


def test_an_idle_tenant_cannot_bank_credit():
    """Work-conserving without hoarding: a tenant idle while another was served starts from the clock, not from 0."""
    fq = FairQueue()
    for i in range(20):
        fq.push(ticket("a", n=i))
    drain(fq, 8)
    for i in range(10):
        fq.push(ticket("b", n=i))
    # b arrived late: it is not owed the 8 requests a got while b was away.
    assert names(drain(fq, 6)) in ("ababab", "bababa")


def test_batch_waits_for_interactive_but_keeps_its_floor():
    fq = FairQueue(batch_min_share=0.1)
    for i in range(100):
        fq.push(ticket("i", prio=INT, n=i))
        fq.push(ticket("b", prio=BAT, n=i))
    first = drain(fq, 100)
    served = Counter(t.priority for t in first)
    assert served[BAT] == 10 and served[INT] == 90
    assert first[0].priority is INT


def test_no_floor_means_strict_priority():
    fq = FairQueue(batch_min_share=0.0)
    for i in range(5):
        fq.push(ticket("b", prio=BAT, n=i))
        fq.push(ticket("i", prio=INT, n=i))
    assert [t.priority for t in drain(fq)] == [INT] * 5 + [BAT] * 5


def test_batch_alone_is_served():
    fq = FairQueue()
    fq.push(ticket("b", prio=BAT))
    assert fq.pop().tenant == "b" and fq.pop() is None


def test_remove_takes_a_waiter_out_at_once():
    fq = FairQueue(max_queued=2)
    a1, a2, b1 = ticket("a", n=1), ticket("a", n=2), ticket("b", n=3)
    for t in (a1, a2, b1):
        fq.push(t)
    assert fq.full_for("a") and not fq.full_for("b")
    assert fq.remove(a1) and not fq.remove(a1)
    assert not fq.full_for("a") and len(fq) == 2 and fq.tenant_waiting("a") == 1
    assert fq.remove(a2)
    assert [t.payload for t in drain(fq)] == [3]
    assert fq.tenant_waiting("a") == 0 and fq.peek() is None


def test_depth_per_band_and_listing():
    fq = FairQueue()
    fq.push(ticket("a", prio=INT))
    fq.push(ticket("b", prio=BAT))
    fq.push(ticket("b", prio=BAT))
    assert (fq.depth(INT), fq.depth(BAT), len(fq)) == (1, 2, 3)
    assert sorted(t.tenant for t in fq.waiting()) == ["a", "b", "b"]


@pytest.mark.parametrize("share, cost", [(0, 1), (-1, 1), (float("nan"), 1), (1, -1), (1, float("nan"))])
def test_bad_tickets_are_refused(share, cost):
    with pytest.raises(ValueError):
        FairQueue().push(ticket("a", share=share, cost=cost))


def test_many_tenants_leave_bounded_state():
    fq = FairQueue()
    for i in range(5000):
        fq.push(ticket(f"t{i}", n=i))
        fq.pop()
    assert len(fq._bands[0].tenants) <= 1024 + 1


# -- properties ----------------------------------------------------------------------

arrival = st.tuples(st.sampled_from("abcd"), st.sampled_from(["k1", "k2"]), st.sampled_from([INT, BAT]),
                    st.integers(1, 50))


@given(st.lists(arrival, max_size=60), st.data())
@settings(max_examples=200, deadline=None)
def test_work_conserving_and_fifo_within_a_key(arrivals, data):
    """Whatever the mix, and with removals: pop returns something while anything waits, each ticket once,
    and a key's tickets (in one band) in arrival order."""
    fq = FairQueue()
    tickets = [ticket(t, key=t + k, prio=p, cost=c, n=i) for i, (t, k, p, c) in enumerate(arrivals)]
    for t in tickets:
        fq.push(t)
    removed = set(data.draw(st.sets(st.integers(0, len(tickets) - 1), max_size=10))) if tickets else set()
    for i in removed:
        assert fq.remove(tickets[i])
    out = drain(fq)
    assert len(fq) == 0 and fq.pop() is None
    assert sorted(t.payload for t in out) == sorted(set(range(len(tickets))) - removed)
    per_key: dict[tuple[str, Priority], list[int]] = {}  # a key's requests may be in both bands (x-infernode-priority)
    for t in out:
        per_key.setdefault((t.key, t.priority), []).append(t.payload)
    assert all(v == sorted(v) for v in per_key.values())


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 64), st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_backlogged_tenants_get_service_in_proportion_to_shares(wa, wb, ca, cb):
    """Two always-backlogged tenants: cost served tracks the shares within one request's cost."""
    fq = FairQueue()
    for i in range(400):
        fq.push(ticket("a", cost=ca, share=wa, n=i))
        fq.push(ticket("b", cost=cb, share=wb, n=i))
    served = {"a": 0.0, "b": 0.0}
    for t in drain(fq, 300):
        served[t.tenant] += t.cost
    if fq.tenant_waiting("a") and fq.tenant_waiting("b"):  # both still backlogged: the SFQ bound holds
        assert abs(served["a"] / wa - served["b"] / wb) <= ca / wa + cb / wb


@given(st.sampled_from([0.05, 0.1, 0.25, 0.5]), st.integers(1, 64), st.integers(1, 64))
@settings(max_examples=100, deadline=None)
def test_batch_floor_holds_under_an_interactive_flood(floor, ci, cb):
    fq = FairQueue(batch_min_share=floor)
    for i in range(600):
        fq.push(ticket("i", prio=INT, cost=ci, n=i))
        fq.push(ticket("b", prio=BAT, cost=cb, n=i))
    served = {INT: 0.0, BAT: 0.0}
    for t in drain(fq, 400):
        served[t.priority] += t.cost
    total = served[INT] + served[BAT]
    assert served[BAT] >= floor * total - max(ci, cb)  # within one request of the floor
    assert served[INT] >= (1 - floor) * total - max(ci, cb)  # and no more than the floor taken from interactive
