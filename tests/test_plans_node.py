"""Plans, /v1/me and money budgets through a real node: a plan change reaches its keys
within a second (also on a second node sharing PostgreSQL), [quotas.default] only for keys
without a plan, and a money budget refused exactly after the request that crosses it."""

from __future__ import annotations

import time

import httpx

from tests.conftest import TINY_MODEL, wait_until
from tests.test_keys_api import chat, shared_pg_url  # noqa: F401  (fixture)
from tests.test_roles import healthy

CONFIG = """
[quotas.default]
rpm = 77

[plans.basic]
models = ["group:small"]
rpm = 10
budget_usd = 2.5
budget_period = "month"
"""


def me(n, secret: str, path: str = "/v1/me", **params) -> httpx.Response:
    return httpx.get(n.url + path, params=params, headers={"authorization": f"Bearer {secret}"}, timeout=10)


def test_plans_from_the_file_and_the_api_and_v1_me(node_factory) -> None:
    n = node_factory("[model_groups]\nsmall = []\n", extra=CONFIG, ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    with n.admin() as c:
        assert c.get("/admin/v1/plans/basic").json()["budget_usd"] == 2.5
        on_plan = c.post("/admin/v1/keys", json={"name": "p", "plan": "basic"}).json()
        plain = c.post("/admin/v1/keys", json={"name": "plain"}).json()
        assert on_plan["rpm"] is None and plain["rpm"] == 77        # [quotas.default] only without a plan
        assert c.post("/admin/v1/keys", json={"name": "x", "plan": "nope"}).json()["error"]["code"] == "plan_not_found"
        assert c.post("/admin/v1/plans", json={"name": "bad", "models": ["group:nope"]}).status_code == 400
        for bad in ({"name": "a b"}, {"name": "x", "rpm": -1}, {"name": "x", "models": "all"},
                    {"name": "x", "budget_usd": "lots"}, {"name": "x", "budget_period": "week"},
                    {"name": "x" * 300}, {"name": "x", "colour": "red"}, [1]):
            r = c.post("/admin/v1/plans", json=bad)
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", bad
        assert c.patch("/admin/v1/plans/nope", json={"rpm": 1}).status_code == 404
        assert c.patch(f"/admin/v1/keys/{plain['id']}", json={"plan": "nope"}).status_code == 400
        assert c.post("/admin/v1/keys", json={"name": "x", "budget_usd": -1}).status_code == 422
        got = me(n, on_plan["key"]).json()
        assert got["id"] == on_plan["id"] and got["plan"] == "basic" and got["name"] == "p"
        lim = got["limits"]["key"]
        assert lim["rpm"] == 10 and lim["budget_usd"] == 2.5 and lim["budget_period"] == "month"
        assert lim["remaining_budget_usd"] == 2.5 and lim["spent_usd"] == 0
        assert "secret_hash" not in str(got) and on_plan["key"] not in str(got)
        # A change through the API: the file's plan is copied to the database and wins; the key follows.
        t = time.monotonic()
        assert c.patch("/admin/v1/plans/basic", json={"rpm": 20}).status_code == 200
        assert wait_until(lambda: me(n, on_plan["key"]).json()["limits"]["key"]["rpm"] == 20, timeout=1, interval=0.02)
        assert time.monotonic() - t < 1.0
        # A key's own field overrides the plan's.
        c.patch(f"/admin/v1/keys/{on_plan['id']}", json={"rpm": 3})
        assert me(n, on_plan["key"]).json()["limits"]["key"]["rpm"] == 3
        assert c.delete("/admin/v1/plans/basic").status_code == 409   # still used by a key
        usage = me(n, on_plan["key"], "/v1/me/usage").json()
        assert usage["object"] == "list" and usage["data"] == [] and usage["key"] == on_plan["id"]
    # Bad input: OpenAI error shape, never a 5xx.
    for params in ({"since": "yesterday"}, {"since": "1e300"}, {"since": "0"}, {"until": "nan"}):
        r = me(n, on_plan["key"], "/v1/me/usage", **params)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", params
    r = me(n, "sk-wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(n.url + "/v1/me", headers={"authorization": f"Bearer {plain['key']}"}).status_code == 404


def test_plan_change_reaches_another_node_within_a_second(node_factory, shared_pg_url: str) -> None:  # noqa: F811
    extra = f'[database]\nurl = "{shared_pg_url}"\n'
    a = node_factory("", extra=extra, ready=False)
    b = node_factory("", extra=extra, ready=False)
    assert wait_until(lambda: healthy(a) and healthy(b), timeout=60)
    with a.admin() as c:
        assert c.post("/admin/v1/plans", json={"name": "gold", "tpm": 1000}).status_code == 201
        secret = c.post("/admin/v1/keys", json={"name": "g", "plan": "gold"}).json()["key"]
        assert wait_until(lambda: me(b, secret).status_code == 200, timeout=3, interval=0.05)
        t = time.monotonic()
        assert c.patch("/admin/v1/plans/gold", json={"tpm": 2000}).status_code == 200
    assert wait_until(lambda: me(b, secret).json()["limits"]["key"]["tpm"] == 2000, timeout=3, interval=0.02)
    took = time.monotonic() - t
    assert took < 1.0, f"node b took {took:.2f}s to see the plan change"


def test_money_budget_exact_to_the_crossing_request(node_factory) -> None:
    n = node_factory(TINY_MODEL + "price_input = 1000.0\nprice_output = 3000.0\n")
    probe = n.create_key(name="probe")
    assert chat(n.url, probe).status_code == 200
    cost = me(n, probe).json()["limits"]["key"]["spent_usd"]
    assert cost > 0
    with n.admin() as c:
        k = c.post("/admin/v1/keys", json={"name": "m", "budget_usd": round(cost * 2.5, 9), "rpm": 100}).json()
    for i in range(3):                      # the third is admitted with half a request's money left
        r = chat(n.url, k["key"])
        assert r.status_code == 200, (i, r.text)
    r = chat(n.url, k["key"])
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    end_of_day = (int(time.time()) // 86400 + 1) * 86400
    assert abs(int(r.headers["x-ratelimit-reset-budget"].rstrip("s")) - (end_of_day - time.time())) < 5
    assert 1 <= int(r.headers["retry-after"]) <= 60   # the SDKs' sane cap: the budget's reset is said above
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-ratelimit-remaining-budget-usd"] == "0"
    assert r.headers["x-ratelimit-limit-requests"] == "100" and r.headers["x-ratelimit-remaining-requests"] == "97"
    lim = me(n, k["key"]).json()["limits"]["key"]
    assert abs(lim["spent_usd"] - 3 * cost) < 1e-6 and lim["remaining_budget_usd"] == 0
    rows = me(n, k["key"], "/v1/me/usage").json()["data"]
    assert len(rows) == 1 and rows[0]["model"] == "tiny-chat" and rows[0]["requests"] == 3
    assert abs(rows[0]["cost"] - 3 * cost) < 1e-6
