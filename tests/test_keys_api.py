"""Keys, teams and quotas through a real node: admin API, CLI, 429s, restarts, and two
nodes sharing one PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

import node.accounts.keys
from node.accounts.keys import KeyRing, hash_secret
from node.errors import AuthenticationError
from tests.conftest import TINY_MODEL, run_cli, start_node, wait_until
from tests.test_storage import PG_URL, _pg_exec, pg_schema_url

NO_MODELS = ""


def healthy(n) -> bool:
    """The node answers (a node with no models is never `ready`)."""
    try:
        return httpx.get(n.url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_secret_compared_in_constant_time(monkeypatch) -> None:
    calls = []
    real = node.accounts.keys.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(node.accounts.keys.hmac, "compare_digest", spy)
    from node.accounts.keys import KeyRecord
    secret = "sk-" + secrets.token_urlsafe(16)
    ring = KeyRing([KeyRecord(id="k", name="n", secret_hash=hash_secret(secret), prefix=secret[:8])])
    assert ring.lookup(secret) is not None
    assert calls == [(hash_secret(secret), hash_secret(secret))]
    assert ring.lookup(secret + "x") is None
    ring.put(ring.get("k").updated(revoked=True))
    with pytest.raises(AuthenticationError) as e:
        ring.lookup(secret)
    assert e.value.code == "key_revoked" and e.value.status == 401


def headers(key: str) -> dict[str, str]:
    # A UUID request id: llama-cpp-python's server rejects any other x-request-id.
    return {"authorization": f"Bearer {key}", "x-request-id": str(uuid.uuid4())}


def chat(url: str, key: str, max_tokens: int = 1, stream: bool = False, user: str | None = None) -> httpx.Response:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}
    if user:
        body["user"] = user
    return httpx.post(url + "/v1/chat/completions", headers=headers(key), json=body, timeout=120)


def test_limits_through_a_real_node_and_restart(node_factory) -> None:
    n = node_factory(TINY_MODEL + "price_input = 1.5\nprice_output = 4.0\n")
    # tpm and a budget reached mid-stream: the stream finishes, the next request is refused.
    ktpm = n.create_key(tpm=20)
    kbud = n.create_key(budget_tokens=20, budget_period="month")
    for k, reason in ((ktpm, "tokens per minute"), (kbud, "budget")):
        r = chat(n.url, k, max_tokens=30, stream=True)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        # Usage is charged before the client reads [DONE]: the very next request counts it.
        refused = chat(n.url, k)
        assert refused.status_code == 429 and reason in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "budget_exceeded"

    # End users under one key.
    fleet = n.create_key(user_rpm=1)
    assert chat(n.url, fleet, user="alice").status_code == 200
    assert chat(n.url, fleet, user="alice").status_code == 429
    assert chat(n.url, fleet, user="bob").status_code == 200

    # rpm = 10 and 100 concurrent requests: exactly 10 admitted.
    k10 = n.create_key(rpm=10)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            return await asyncio.gather(*(c.post(n.url + "/v1/chat/completions", headers=headers(k10), json=body)
                                          for _ in range(100)))
    rs = asyncio.run(burst())
    limited = [r for r in rs if r.status_code == 429]
    assert len(limited) == 90 and sorted({r.status_code for r in rs}) == [200, 429]
    assert all(r.headers["retry-after"].isdigit() and 1 <= int(r.headers["retry-after"]) <= 60 for r in limited)
    assert limited[0].headers["x-ratelimit-limit-requests"] == "10"
    assert limited[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    ok = [r for r in rs if r.status_code == 200]
    assert {r.headers["x-ratelimit-limit-requests"] for r in ok} == {"10"}
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))

    # A team's limits are shared by its keys.
    run_cli("teams", "create", "red", "--rpm", "2", config=n.config, check=True)
    a = n.create_key(team="red")
    b = n.create_key(team="red")
    assert chat(n.url, a).status_code == 200 and chat(n.url, b).status_code == 200
    r = chat(n.url, a)
    assert r.status_code == 429 and "team" in r.json()["error"]["message"]

    usage = json.loads(run_cli("usage", "--group-by", "team,day", "--format", "json", config=n.config,
                               check=True).stdout)
    red = [u for u in usage if u["team"] == "red"]
    assert red and red[0]["requests"] == 2 and red[0]["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    csv = run_cli("usage", "--group-by", "model", "--format", "csv", config=n.config, check=True).stdout
    assert csv.splitlines()[0] == "model,requests,prompt_tokens,completion_tokens,errors,cost"
    assert csv.splitlines()[1].startswith("tiny-chat,")
    (m,) = json.loads(run_cli("usage", "--group-by", "model", "--format", "json", config=n.config, check=True).stdout)
    assert m["cost"] == pytest.approx((m["prompt_tokens"] * 1.5 + m["completion_tokens"] * 4.0) / 1e6)
    assert m["cost"] > 0

    # A restart resets neither a budget nor a rate window (rebuilt from the ledger).
    assert n.stop() == 0
    n2 = start_node(n.config, lock=False)
    try:
        n2.wait_ready()
        r = chat(n2.url, kbud)
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
        r = chat(n2.url, k10)
        assert r.status_code == 429 and "requests per minute" in r.json()["error"]["message"]
        assert chat(n2.url, a).status_code == 429          # the team's window too
    finally:
        n2.stop()


def test_keys_admin_cli_revoked_and_expired(node_factory) -> None:
    n = node_factory(NO_MODELS, ready=False)
    assert wait_until(lambda: healthy(n), timeout=60)
    out = run_cli("keys", "create", "--name", "cli", "--rpm", "5", "--model", "tiny-chat", "--budget", "1000",
                  "--period", "month", "--meta", "owner=ops", "--json", config=n.config, check=True).stdout
    created = json.loads(out)
    secret, kid = created["key"], created["id"]
    assert secret.startswith("sk-") and created["models"] == ["tiny-chat"] and created["metadata"] == {"owner": "ops"}
    listed = run_cli("keys", "list", "--json", config=n.config, check=True).stdout
    assert secret not in listed and "secret_hash" not in listed and kid in listed
    got = json.loads(run_cli("keys", "get", kid, config=n.config, check=True).stdout)
    assert got["budget_tokens"] == 1000 and "key" not in got
    upd = json.loads(run_cli("keys", "update", kid, "--rpm", "7", "--all-models", config=n.config, check=True).stdout)
    assert upd["rpm"] == 7 and upd["models"] is None

    def models(key: str) -> httpx.Response:
        return httpx.get(n.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert models(secret).status_code == 200
    run_cli("keys", "revoke", kid, config=n.config, check=True)
    r = models(secret)
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"

    with n.admin() as c:
        short = c.post("/admin/v1/keys", json={"name": "short", "expires_at": time.time() + 60}).json()
        assert models(short["key"]).status_code == 200
        # Its expiry passing, without waiting for it: the node compares expires_at with its clock per request.
        assert c.patch(f"/admin/v1/keys/{short['id']}", json={"expires_at": time.time() - 1}).status_code == 200
        r = models(short["key"])
        assert r.status_code == 401 and r.json()["error"]["code"] == "key_expired"
        bad = c.post("/admin/v1/keys", json={"name": "x", "rpm": -1})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "rpm"
        assert c.post("/admin/v1/teams", json={"name": "blue", "tpm": 10}).status_code == 201
        assert c.post("/admin/v1/teams", json={"name": "blue"}).status_code == 409
        assert c.patch("/admin/v1/teams/blue", json={"tpm": 20}).json()["tpm"] == 20
        assert c.get("/admin/v1/teams/nope").status_code == 404
        assert c.delete("/admin/v1/teams/blue").status_code == 200
        assert c.get("/admin/v1/teams").json()["data"] == []
    p = run_cli("usage", "--format", "xml", config=n.config)
    assert p.returncode == 1 and "--format" in p.stderr


@pytest.fixture
def shared_pg_url() -> Iterator[str]:
    """One schema on the shared PostgreSQL (INFERNODE_TEST_POSTGRES_URL) for this test's nodes."""
    if not PG_URL:
        pytest.skip("INFERNODE_TEST_POSTGRES_URL is not set")
    schema = "t_" + secrets.token_hex(6)
    _pg_exec(f"CREATE SCHEMA {schema}")
    yield pg_schema_url(PG_URL, schema)
    _pg_exec(f"DROP SCHEMA {schema} CASCADE")


def test_two_nodes_on_one_postgres_see_a_revocation_within_a_second(node_factory, shared_pg_url: str) -> None:
    extra = f'[database]\nurl = "{shared_pg_url}"\n'
    a = node_factory(NO_MODELS, extra=extra, ready=False)
    b = node_factory(NO_MODELS, extra=extra, ready=False)
    assert wait_until(lambda: healthy(a) and healthy(b), timeout=60)
    secret = a.create_key(name="shared")

    def status(n) -> int:
        return httpx.get(n.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=5).status_code
    assert wait_until(lambda: status(b) == 200, timeout=2, interval=0.05)     # created on a, known to b
    with a.admin() as c:
        kid = c.get("/admin/v1/keys").json()["data"][0]["id"]
        t = time.monotonic()
        assert c.post(f"/admin/v1/keys/{kid}/revoke").status_code == 200
    assert status(a) == 401
    assert wait_until(lambda: status(b) == 401, timeout=3, interval=0.02)
    took = time.monotonic() - t
    assert took < 1.0, f"node b took {took:.2f}s to see the revocation"


def test_a_key_created_during_a_key_refresh_is_not_lost(tmp_path, monkeypatch):
    """The refresh loop reads every key, then swaps the ring: a key written in between must survive it."""
    import asyncio
    import threading

    from node.app import Node
    from node.config import load_config
    from tests.conftest import TINY_MODEL, write_config

    node = Node(load_config(write_config(tmp_path, TINY_MODEL)))
    from node.accounts.storage import open_storage

    storage = open_storage(node.config.database_url())
    storage.migrate()
    listing, release = threading.Event(), threading.Event()
    real_list = storage.list_keys

    def slow_list():
        rows = real_list()           # read before the new key is written...
        listing.set()
        release.wait(5)              # ...and swapped in after it
        return rows

    async def race() -> str:
        await node.accounts.open(storage, "sk-admin-" + "x" * 40)
        monkeypatch.setattr(storage, "list_keys", slow_list)
        refresh = asyncio.create_task(node.accounts.refresh(force=True))
        await asyncio.to_thread(listing.wait, 5)
        create = asyncio.create_task(node.accounts.create_key(name="new"))
        await asyncio.sleep(0.2)
        release.set()
        await refresh
        record, secret = await create
        return secret

    secret = asyncio.run(race())
    assert node.accounts.keys.lookup(secret) is not None
    storage.close()
