"""Plans, model groups and money budgets in memory: overrides, live plan changes, the
request that crosses a money budget, and the x-ratelimit-* headers on every refusal."""

from __future__ import annotations

import calendar

import pytest

from node.accounts.plans import PlanRecord, effective, expand_models
from node.accounts.quotas import Quotas
from node.accounts.storage import UsageRow
from node.accounts.teams import TeamRecord
from node.errors import PermissionDenied
from tests.test_quotas import T0, key, refused

GROUPS = {"small": ("a", "b")}


def test_effective_limits_key_over_plan() -> None:
    plan = PlanRecord(name="p", models=("group:small", "c"), rpm=10, tpm=100, budget_usd=5.0, budget_period="month")
    e = effective(key(plan="p", rpm=3), plan, GROUPS)
    assert (e.rpm, e.tpm, e.budget_usd, e.budget_period) == (3, 100, 5.0, "month")
    assert e.models == frozenset({"a", "b", "c"})
    # A key that sets its own budget brings its own period; its own models replace the plan's.
    e = effective(key(plan="p", budget_tokens=7, budget_period="day", models=("z",)), plan, GROUPS)
    assert (e.budget_tokens, e.budget_usd, e.budget_period, e.models) == (7, 5.0, "day", frozenset({"z"}))
    assert effective(key(), None, GROUPS).models is None
    assert expand_models(["group:nope", "x"], GROUPS) == frozenset({"x"})


def test_plan_limits_and_models_apply_and_change_live() -> None:
    q = Quotas()
    q.set_teams([], {"basic": PlanRecord(name="basic", models=("group:small",), rpm=2)}, GROUPS)
    k = key(plan="basic")
    q.admit(k, "a", now=T0)
    q.admit(k, "b", now=T0 + 1)
    assert refused(q, k, T0 + 2, model="a").reason == "key_rpm"
    with pytest.raises(PermissionDenied):
        q.admit(k, "c", now=T0 + 3)
    assert q.allows(k, "a") and not q.allows(k, "c")
    # The plan changes (an admin PATCH reaches every node through the settings version): the same
    # key record, unchanged, gets the new limits at its next request.
    q.set_teams([], {"basic": PlanRecord(name="basic", models=None, rpm=3)}, GROUPS)
    q.admit(k, "c", now=T0 + 4)
    assert refused(q, k, T0 + 5).reason == "key_rpm"
    # A key's own field beats the plan's.
    own = key(id="key_2", plan="basic", rpm=100)
    for i in range(10):
        q.admit(own, "a", now=T0 + i)


def test_team_plan_limits_and_models() -> None:
    q = Quotas()
    q.set_teams([TeamRecord(name="red", plan="team")], {"team": PlanRecord(name="team", models=("a",), rpm=1)}, {})
    k = key(team="red")
    q.admit(k, "a", now=T0)
    assert refused(q, key(id="key_2", team="red"), T0 + 1, model="a").reason == "team_rpm"
    with pytest.raises(PermissionDenied):
        q.admit(key(id="key_3", team="red"), "b", now=T0 + 2)


def test_money_budget_refuses_after_the_request_that_crosses_it() -> None:
    q = Quotas()
    q.set_prices({"m": (1_000_000.0, 2_000_000.0)})        # $1 per prompt token, $2 per completion token
    k = key(budget_usd=5.0)
    q.admit(k, "m", now=T0).finish(1, 1, now=T0)           # $3 spent, $2 left
    q.admit(k, "m", now=T0 + 1).finish(1, 1, now=T0 + 1)   # admitted with $2 left: crosses to $6
    err = refused(q, k, T0 + 2)
    assert err.code == "budget_exceeded" and err.reason == "key_budget_usd" and err.status == 429
    assert err.retry_after == 3600 - 2                     # T0 is an hour before the UTC day ends
    assert err.headers["x-ratelimit-limit-budget-usd"] == "5"
    assert err.headers["x-ratelimit-remaining-budget-usd"] == "0"
    assert err.headers["x-ratelimit-reset-budget"] == f"{3600 - 2}s"
    assert q.used("key", "key_1", "day", now=T0 + 2) == (4, 6.0)
    q.admit(k, "m", now=T0 + 3601)                         # a new day
    # A model without prices costs nothing; a plan's money budget applies to its keys.
    q.set_teams([], {"p": PlanRecord(name="p", budget_usd=0.5, budget_period="month")}, {})
    onplan = key(id="key_p", plan="p")
    q.admit(onplan, "free", now=T0).finish(1000, 1000, now=T0)
    q.admit(onplan, "m", now=T0).finish(1, 0, now=T0)
    err = refused(q, onplan, T0 + 1)
    assert err.reason == "key_budget_usd" and "$0.5" in err.message and err.retry_after == 3600 - 1


def test_team_money_budget_and_rebuild() -> None:
    q = Quotas()
    q.set_prices({"m": (1_000_000.0, 0.0)})
    q.set_teams([TeamRecord(name="red", budget_usd=2.0)])
    a, b = key(id="a", team="red"), key(id="b", team="red")
    q.admit(a, "m", now=T0).finish(2, 0, now=T0)
    assert refused(q, b, T0 + 1).reason == "team_budget_usd"
    # A restart rebuilds money from the ledger's cost column.
    q2 = Quotas()
    q2.set_teams([TeamRecord(name="red", budget_usd=2.0)])
    row = UsageRow("r1", T0, "a", "red", "m", "chat", None, 2, 0, 200, 5.0, 1.0, 2.0)
    q2.rebuild([row], {}, {}, now=T0 + 1, day_costs={"team": {"red": 2.0}}, month_costs={"team": {"red": 2.0}})
    assert refused(q2, b, T0 + 2).reason == "team_budget_usd"


def test_every_refusal_carries_the_headers_of_its_limit() -> None:
    q = Quotas()
    k = key(rpm=100, tpm=1000, max_parallel=1)
    q.admit(k, "m", now=T0)
    err = refused(q, k, T0 + 1)
    assert err.reason == "key_parallel"
    assert err.headers["x-ratelimit-limit-parallel"] == "1" and err.headers["x-ratelimit-remaining-parallel"] == "0"
    assert err.headers["x-ratelimit-limit-requests"] == "100" and err.headers["x-ratelimit-limit-tokens"] == "1000"
    assert err.headers["retry-after"] == "1"
    b = key(id="key_b", budget_tokens=10, rpm=50)
    q.admit(b, "m", now=T0).finish(10, 0, now=T0)
    err = refused(q, b, T0 + 1)
    assert err.headers["x-ratelimit-limit-budget-tokens"] == "10"
    assert err.headers["x-ratelimit-limit-requests"] == "50" and err.headers["x-ratelimit-remaining-requests"] == "49"


def test_month_period_from_plan() -> None:
    q = Quotas()
    q.set_teams([], {"p": PlanRecord(name="p", budget_tokens=5, budget_period="month")}, {})
    k = key(plan="p")
    q.admit(k, "m", now=T0 - 86400).finish(5, 0, now=T0 - 86400)
    err = refused(q, k, T0)                                 # still March: the month's budget is spent
    assert err.retry_after == 3600
    q.admit(k, "m", now=float(calendar.timegm((2026, 4, 1, 0, 0, 1))))


def test_config_plans_groups_and_fallbacks_are_checked() -> None:
    from pathlib import Path

    from node.config import parse_config
    from node.errors import ConfigError
    models = [{"name": "a", "runtime": "external", "url": "http://x"},
              {"name": "b", "runtime": "external", "url": "http://y", "fallbacks": ["a"]}]
    cfg = parse_config({"models": models, "model_groups": {"small": ["a", "b"]},
                        "plans": {"basic": {"models": ["group:small"], "budget_usd": 1.5}}}, Path("x.toml"))
    assert cfg.plans["basic"].budget_usd == 1.5 and cfg.model("b").fallbacks == ["a"]
    bad = [
        ({"models": models, "plans": {"p": {"models": ["group:none"]}}}, "plans.p.models"),
        ({"models": models, "model_groups": {"g": ["zzz"]}}, "model_groups.g"),
        ({"models": [models[0], {**models[1], "fallbacks": ["zzz"]}]}, "models[1].fallbacks"),
        ({"models": [{**models[0], "fallbacks": ["a"]}]}, "models[0].fallbacks"),
        ({"plans": {"p": {"rpm": -1}}}, "plans.p.rpm"),
        ({"plans": {"p": {"budget_period": "week"}}}, "plans.p.budget_period"),
        ({"plans": {"p": {"colour": "red"}}}, "plans.p.colour"),
    ]
    for raw, where in bad:
        with pytest.raises(ConfigError) as e:
            parse_config(raw, Path("x.toml"))
        assert where in e.value.message, (where, e.value.message)
