"""Admission in memory: rpm exact (sliding-window log), tpm and budgets checked before and
charged after, max parallel, teams, end users, rebuild from ledger rows."""

from __future__ import annotations

import asyncio
import calendar

import pytest

from node.accounts.keys import KeyRecord
from node.accounts.quotas import Quotas
from node.accounts.storage import UsageRow
from node.accounts.teams import TeamRecord
from node.errors import AuthenticationError, PermissionDenied, RateLimited

T0 = float(calendar.timegm((2026, 3, 31, 23, 0, 0)))  # an hour before a new UTC day and month


def key(**kw) -> KeyRecord:
    return KeyRecord(**{"id": "key_1", "name": "k", "secret_hash": "h", "prefix": "sk-x", **kw})


def refused(q: Quotas, k: KeyRecord, now: float, user: str | None = None, model: str = "m") -> RateLimited:
    with pytest.raises(RateLimited) as e:
        q.admit(k, model, user, now=now)
    return e.value


def test_rpm_exact_under_100_concurrent_requests() -> None:
    q, k = Quotas(), key(rpm=10)

    async def one(i: int) -> bool:
        await asyncio.sleep(0)
        try:
            q.admit(k, "m", now=T0 + i * 0.001)
            return True
        except RateLimited as e:
            assert e.reason == "key_rpm" and e.status == 429
            assert isinstance(e.retry_after, int) and 1 <= e.retry_after <= 60
            assert e.headers["retry-after"] == str(e.retry_after)
            assert e.headers["x-ratelimit-remaining-requests"] == "0"
            return False

    async def run() -> list[bool]:
        return await asyncio.gather(*(one(i) for i in range(100)))

    assert sum(asyncio.run(run())) == 10


def test_rpm_is_a_sliding_window_not_a_fixed_one() -> None:
    q, k = Quotas(), key(rpm=10)
    for i in range(5):
        q.admit(k, "m", now=T0 + i * 0.1)
    for i in range(5):
        q.admit(k, "m", now=T0 + 30 + i)
    err = refused(q, k, T0 + 40)
    assert err.retry_after == 20               # the oldest admission leaves the window at T0 + 60
    adm = None
    for i in range(5):                          # the first five have left; the last five have not
        adm = q.admit(k, "m", now=T0 + 61 + i * 0.01)
    assert adm is not None and adm.headers["x-ratelimit-remaining-requests"] == "0"
    assert adm.headers["x-ratelimit-limit-requests"] == "10"
    refused(q, k, T0 + 62)


def test_tpm_checked_before_charged_after() -> None:
    q, k = Quotas(), key(tpm=100)
    a = q.admit(k, "m", now=T0)
    b = q.admit(k, "m", now=T0 + 0.1)       # nothing charged yet: both in flight
    a.finish(60, 30, now=T0 + 1)
    assert q.admit(k, "m", now=T0 + 1.5).headers["x-ratelimit-remaining-tokens"] == "10"
    b.finish(20, 20, now=T0 + 2)            # the stream ends past the limit: charged in full
    err = refused(q, k, T0 + 3)
    assert err.reason == "key_tpm"
    assert err.retry_after == 59            # second T0 + 1's 90 tokens leave at T0 + 62, leaving 40 < 100
    assert err.headers["x-ratelimit-limit-tokens"] == "100"
    assert err.headers["x-ratelimit-remaining-tokens"] == "0"
    refused(q, k, T0 + 61.5)
    q.admit(k, "m", now=T0 + 62.5)


def test_budget_per_day_and_month_utc() -> None:
    q = Quotas()
    day, month = key(id="d", budget_tokens=100, budget_period="day"), key(id="m", budget_tokens=100, budget_period="month")
    for k in (day, month):
        q.admit(k, "m", now=T0).finish(70, 40, now=T0 + 1)
        err = refused(q, k, T0 + 2)
        assert err.reason == "key_budget" and err.code == "budget_exceeded"
    # A new UTC day (and here also a new month) starts at T0 + 3600.
    q.admit(day, "m", now=T0 + 3601)
    q.admit(month, "m", now=T0 + 3601)
    mid_month = float(calendar.timegm((2026, 4, 10, 12, 0, 0)))
    q.admit(month, "m", now=mid_month).finish(100, 0, now=mid_month)
    # The wait is the seconds to the period's end (May 1st), said in x-ratelimit-reset-budget; Retry-After stays
    # within the SDKs' sane cap (the anthropic SDK sleeps for any value), and the refusal is not retryable.
    err = refused(q, month, mid_month + 86400 * 2)
    may1 = float(calendar.timegm((2026, 5, 1, 0, 0, 0)))
    assert err.retry_after == int(may1 - (mid_month + 86400 * 2))
    assert err.headers["retry-after"] == "60" and not err.retryable
    assert err.headers["x-ratelimit-reset-budget"] == f"{err.retry_after}s"
    assert err.headers["x-ratelimit-limit-budget-tokens"] == "100"
    assert err.headers["x-ratelimit-remaining-budget-tokens"] == "0"
    q.admit(day, "m", now=mid_month).finish(100, 0, now=mid_month)
    q.admit(day, "m", now=mid_month + 86400)


def test_max_parallel() -> None:
    q, k = Quotas(), key(max_parallel=2)
    a = q.admit(k, "m", now=T0)
    q.admit(k, "m", now=T0)
    assert refused(q, k, T0).reason == "key_parallel"
    a.finish(0, 0, now=T0)
    a.finish(0, 0, now=T0)   # a second finish is ignored, not a second release
    q.admit(k, "m", now=T0)
    assert refused(q, k, T0).reason == "key_parallel"


def test_models_revoked_expired() -> None:
    q = Quotas()
    with pytest.raises(PermissionDenied) as e:
        q.admit(key(models=("a",)), "b", now=T0)
    assert e.value.status == 403
    q.admit(key(models=("a",)), "a", now=T0)
    with pytest.raises(AuthenticationError) as e:
        q.admit(key(revoked=True), "a", now=T0)
    assert e.value.code == "key_revoked" and e.value.status == 401
    with pytest.raises(AuthenticationError) as e:
        q.admit(key(expires_at=T0), "a", now=T0)
    assert e.value.code == "key_expired"
    q.admit(key(expires_at=T0 + 1), "a", now=T0)


def test_team_limits_shared_by_its_keys() -> None:
    q = Quotas()
    q.set_teams([TeamRecord(name="red", rpm=3, budget_tokens=50)])
    k1, k2 = key(id="k1", team="red"), key(id="k2", team="red")
    loner = key(id="k3", team="blue")          # a team name with no team record: no team limits
    q.admit(k1, "m", now=T0)
    q.admit(k2, "m", now=T0)
    q.admit(k1, "m", now=T0).finish(40, 20, now=T0)
    err = refused(q, k2, T0 + 1)
    assert err.reason == "team_rpm" and "team" in err.message
    for _ in range(5):
        q.admit(loner, "m", now=T0)
    assert refused(q, k2, T0 + 61).reason == "team_budget"


def test_end_user_limits_under_one_key() -> None:
    q, k = Quotas(), key(user_rpm=2, user_tpm=10, rpm=100)
    first = q.admit(k, "m", "alice", now=T0)
    q.admit(k, "m", "alice", now=T0).finish(5, 5, now=T0)
    assert refused(q, k, T0, "alice").reason == "user_rpm"
    bob = q.admit(k, "m", "bob", now=T0)
    bob.finish(10, 0, now=T0)
    assert refused(q, k, T0 + 1, "bob").reason == "user_tpm"
    q.admit(k, "m", None, now=T0)              # no `user`: only the key's own limits
    carol = q.admit(k, "m", "carol", now=T0 + 61)
    assert q.sweep(now=T0 + 200) == 1           # idle end-user counters are forgotten (bob) ...
    first.finish(1, 1, now=T0 + 200)
    carol.finish(1, 1, now=T0 + 200)
    assert q.sweep(now=T0 + 200) == 0           # ... not those with requests in flight or recent tokens
    assert q.sweep(now=T0 + 261) == 2


def test_rebuild_from_ledger_rows() -> None:
    now = T0 + 10
    rows = [UsageRow(request_id=f"r{i}", ts=now - 5 + i * 0.1, key_id="k1", team="red", model="m", endpoint="chat",
                     end_user="u", prompt_tokens=10, completion_tokens=10, status=200, latency_ms=100, ttft_ms=None,
                     cost=0) for i in range(5)]
    q = Quotas()
    q.set_teams([TeamRecord(name="red", budget_tokens=1000)])
    q.rebuild(rows, {"key": {"k1": 500}, "team": {"red": 1000}}, {"key": {"k1": 900}}, now)
    assert refused(q, key(id="k1", rpm=5), now).reason == "key_rpm"
    assert refused(q, key(id="k1", tpm=100), now).reason == "key_tpm"
    assert refused(q, key(id="k1", user_rpm=5), now, "u").reason == "user_rpm"
    assert refused(q, key(id="k1", budget_tokens=900, budget_period="month"), now).reason == "key_budget"
    q.admit(key(id="k1", budget_tokens=901, budget_period="month"), "m", now=now)
    assert refused(q, key(id="k2", team="red"), now).reason == "team_budget"
    q.admit(key(id="k1", budget_tokens=501), "m", now=now)


def test_end_user_counters_are_bounded_per_key_and_in_size() -> None:
    """1,500 end users of 200 KB each under one key: at most MAX_PER_KEY counters, none holding the name."""
    import tracemalloc

    from node.accounts.endusers import MAX_PER_KEY
    q = Quotas()
    flooder, other = key(id="flood", user_rpm=5, rpm=100_000), key(id="other", user_rpm=1)
    q.admit(other, "m", "victim", now=T0).finish(1, 1, now=T0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(1500):
        name = f"{i:06d}" + "x" * 200_000
        q.admit(flooder, "m", name, now=T0 + i * 0.001).finish(1, 1, now=T0 + i * 0.001)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(q) <= 2 + MAX_PER_KEY + 1                  # key scopes, the flooder's end users, the victim
    assert grown < 8 << 20, f"end-user table grew {grown / 2**20:.1f} MiB"
    # the other key's end user was not evicted by the flood: its limit still holds
    assert refused(q, other, T0 + 2, "victim").reason == "user_rpm"
    # the most recent end user of the flooder is still counted
    last = "001499" + "x" * 200_000
    for _ in range(4):
        q.admit(flooder, "m", last, now=T0 + 2)
    assert refused(q, flooder, T0 + 2, last).reason == "user_rpm"


def test_failure_pacer_is_bounded_and_per_address() -> None:
    from node.accounts.pacing import FailurePacer
    t = [0.0]
    p = FailurePacer(per_minute=20, burst=20, max_addresses=1000, clock=lambda: t[0])
    for _ in range(20):
        assert p.retry_after("a") == 0
        p.failed("a")
    assert p.retry_after("a") == 3 and p.retry_after("b") == 0
    for i in range(100_000):                     # a spray of addresses: the table stays bounded
        p.failed(f"10.{i}")
    assert len(p) == 1000
    t[0] += 3
    assert p.retry_after("a") == 0               # evicted, or refilled: either way it may try again
    off = FailurePacer(per_minute=0)
    for _ in range(100):
        off.failed("a")
    assert off.retry_after("a") == 0 and len(off) == 0
