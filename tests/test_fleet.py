"""Fleet registration against a stand-in of LiteLLM's model-management API, in process and with a real node."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from pathlib import Path

import httpx
import pytest
import yaml

from node.accounts.keys import KeyRecord, KeyRing, hash_secret, new_key_id, new_secret
from node.config import parse_config
from node.ops.fleet import (
    FleetReconciler,
    LiteLLMAdmin,
    deployment_id,
    desired_deployments,
    ensure_fleet_key,
    id_prefix,
    model_list_yaml,
    read_master_key,
)
from tests.conftest import TINY_MODEL, free_port, run_cli, start_node, wait_until, write_config
from tests.fakes.litellm_admin import LiteLLMAdminFake

MASTER = "sk-master-test"


@pytest.fixture
def fake():
    f = LiteLLMAdminFake(free_port(), MASTER).start()
    yield f
    f.stop()


def _config(tmp_path: Path, proxy: str, *, name: str = "box-1", rpm: int | None = None) -> object:
    models = [{"name": "chat-a", "source": "builtin:tiny-chat#*.gguf", "runtime": "llamacpp", "tags": ["cpu"],
               **({"rpm": rpm} if rpm else {}), "tpm": 5000, "order": 2},
              {"name": "chat-b", "source": "builtin:tiny-chat#*.gguf", "runtime": "llamacpp"}]
    raw = {"node": {"name": name, "data_dir": str(tmp_path / "data")}, "models": models,
           "fleet": {"litellm": {"url": proxy, "advertise_url": "http://box-1.lan:8080/"}}}
    return parse_config(raw, tmp_path / "appliance.toml")


def _reconciler(cfg, proxy_url: str, ready: set[str], key: str = "sk-fleet-1", **kw) -> FleetReconciler:
    async def api_key() -> str:
        return key

    return FleetReconciler(cfg, LiteLLMAdmin(proxy_url, MASTER), ready_models=lambda: sorted(ready), api_key=api_key,
                           backoff_initial_s=0.05, backoff_max_s=0.2, **kw)


def test_deployment_ids_are_stable_and_distinct(tmp_path):
    cfg = _config(tmp_path, "http://proxy:4000")
    a = deployment_id("box-1", "chat-a", "http://box-1.lan:8080")
    assert a == deployment_id("box-1", "chat-a", "http://box-1.lan:8080/")
    assert a.startswith(id_prefix("box-1"))
    assert a != deployment_id("box-2", "chat-a", "http://box-1.lan:8080")
    assert a != deployment_id("box-1", "chat-b", "http://box-1.lan:8080")
    [dep] = desired_deployments(cfg, "sk-x", ["chat-a"])
    assert dep.id == a
    assert dep.body()["litellm_params"] == {"model": "openai/chat-a", "api_base": "http://box-1.lan:8080/v1",
                                           "api_key": "sk-x", "tpm": 5000, "order": 2, "tags": ["cpu"]}


def test_model_list_yaml_parses_back(tmp_path):
    cfg = _config(tmp_path, "http://proxy:4000", rpm=60)
    deps = desired_deployments(cfg, 'sk-"odd: key', ["chat-a", "chat-b"])
    doc = yaml.safe_load(model_list_yaml(deps))
    assert [d["model_name"] for d in doc["model_list"]] == ["chat-a", "chat-b"]
    first = doc["model_list"][0]
    assert first["litellm_params"]["api_key"] == 'sk-"odd: key'
    assert first["litellm_params"]["rpm"] == 60 and first["litellm_params"]["tags"] == ["cpu"]
    assert first["model_info"]["id"] == deps[0].id


def test_register_update_delete_and_restart_without_duplicates(tmp_path, fake):
    cfg = _config(tmp_path, fake.url)
    ready = {"chat-a"}

    async def scenario() -> None:
        r = _reconciler(cfg, fake.url, ready)
        assert await r.sync() == [deployment_id("box-1", "chat-a", "http://box-1.lan:8080")]
        assert fake.models[r.status.registered[0]]["litellm_params"]["api_key"] == "sk-fleet-1"
        # A model becomes ready: added; one goes away: deleted.
        ready.add("chat-b")
        assert len(await r.sync()) == 2
        ready.discard("chat-a")
        await r.sync()
        assert fake.ids() == [deployment_id("box-1", "chat-b", "http://box-1.lan:8080")]
        # Nothing changed: no writes at all.
        writes = sum(1 for m, _ in fake.calls if m != "GET")
        await r.sync()
        assert sum(1 for m, _ in fake.calls if m != "GET") == writes
        await r.admin.aclose()
        # A restarted node (new process, new key) updates in place instead of duplicating.
        ready.add("chat-a")
        r2 = _reconciler(cfg, fake.url, ready, key="sk-fleet-2")
        await r2.sync()
        assert len(fake.ids()) == 2
        assert {m["litellm_params"]["api_key"] for m in fake.models.values()} == {"sk-fleet-2"}
        assert ("POST", "/model/update") in fake.calls
        assert await r2.stop(deregister=False) == 0 and len(fake.ids()) == 2
        r2.status.registering = True
        assert await r2.stop(deregister=True) == 2
        assert fake.ids() == []
        await r2.admin.aclose()

    asyncio.run(scenario())


def test_other_deployments_are_left_alone(tmp_path, fake):
    fake.models["someone-else"] = {"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"},
                                   "model_info": {"id": "someone-else"}}
    other = _config(tmp_path, fake.url, name="box-2")

    async def scenario() -> None:
        r_other = _reconciler(other, fake.url, {"chat-a"})
        await r_other.sync()
        r = _reconciler(_config(tmp_path, fake.url), fake.url, set())
        await r.sync()  # this node has nothing ready: it must not delete box-2's or anyone's
        assert "someone-else" in fake.models and len(fake.ids()) == 2
        await r.admin.aclose()
        await r_other.admin.aclose()

    asyncio.run(scenario())


def test_proxy_down_then_up_is_retried_with_backoff(tmp_path):
    port = free_port()
    cfg = _config(tmp_path, f"http://127.0.0.1:{port}")

    async def scenario() -> None:
        r = _reconciler(cfg, f"http://127.0.0.1:{port}", {"chat-a"})
        r.start()
        for _ in range(200):  # two failed attempts, the second after a backoff
            if r.status.failures >= 2:
                break
            await asyncio.sleep(0.05)
        assert r.status.failures >= 2 and "unreachable" in r.status.last_error
        proxy = LiteLLMAdminFake(port, MASTER).start()
        try:
            for _ in range(100):  # the proxy holds the deployment a moment before the reconciler records success
                if proxy.ids() and r.status.last_error is None:
                    break
                await asyncio.sleep(0.05)
            assert len(proxy.ids()) == 1 and r.status.last_error is None and r.status.failures == 0
            await r.stop(deregister=True)
            assert proxy.ids() == []
        finally:
            proxy.stop()
            await r.admin.aclose()

    asyncio.run(scenario())


def test_wrong_master_key_and_no_database_say_what_to_fix(tmp_path, fake):
    cfg = _config(tmp_path, fake.url)

    async def scenario() -> None:
        bad = FleetReconciler(cfg, LiteLLMAdmin(fake.url, "sk-wrong"), ready_models=lambda: ["chat-a"],
                              api_key=lambda: asyncio.sleep(0, "k"))
        with pytest.raises(Exception, match="master key.*master_key_env"):
            await bad.sync()
        await bad.admin.aclose()
        fake.database = False
        r = _reconciler(cfg, fake.url, {"chat-a"})
        with pytest.raises(Exception, match="STORE_MODEL_IN_DB=True.*infernode fleet config"):
            await r.sync()
        await r.admin.aclose()

    asyncio.run(scenario())


def test_add_of_an_id_the_proxy_already_stores_becomes_an_update(tmp_path, fake):
    cfg = _config(tmp_path, fake.url)
    [dep] = desired_deployments(cfg, "sk-old", ["chat-a"])
    fake.models[dep.id] = {**dep.body(), "model_info": {"id": dep.id}}

    async def scenario() -> None:
        r = _reconciler(cfg, fake.url, {"chat-a"}, key="sk-new")
        r.admin.deployments = lambda prefix: asyncio.sleep(0, {})  # the proxy's router has not loaded it yet
        await r.sync()
        await r.admin.aclose()

    asyncio.run(scenario())
    assert fake.ids() == [dep.id] and fake.models[dep.id]["litellm_params"]["api_key"] == "sk-new"


def test_master_key_from_env_else_file(tmp_path, monkeypatch):
    (tmp_path / "litellm.key").write_text("sk-from-file\n")
    raw = {"node": {"data_dir": str(tmp_path / "data")},
           "fleet": {"litellm": {"url": "http://p:4000", "advertise_url": "http://n:8080",
                                 "master_key_env": "TEST_FLEET_MK", "master_key_file": "litellm.key"}}}
    cfg = parse_config(raw, tmp_path / "appliance.toml")
    monkeypatch.delenv("TEST_FLEET_MK", raising=False)
    assert read_master_key(cfg) == "sk-from-file"
    monkeypatch.setenv("TEST_FLEET_MK", "sk-from-env")
    assert read_master_key(cfg) == "sk-from-env"


def test_fleet_key_is_created_once_and_replaced_when_revoked(tmp_path):
    cfg = _config(tmp_path, "http://proxy.lan:4000")
    ring = KeyRing()
    made: list[dict] = []

    async def create_key(**fields):
        made.append(fields)
        secret = new_secret()
        rec = KeyRecord(id=new_key_id(), secret_hash=hash_secret(secret), prefix=secret[:8], **fields)
        ring.put(rec)
        return rec, secret

    async def scenario() -> None:
        first = await ensure_fleet_key(cfg, ring.get, create_key)
        assert made[0]["name"] == "fleet:proxy.lan:4000"
        path = cfg.data_dir / "fleet.key"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await ensure_fleet_key(cfg, ring.get, create_key) == first and len(made) == 1
        ring.put(ring.get(first[0]).updated(revoked=True))
        second = await ensure_fleet_key(cfg, ring.get, create_key)
        assert second != first and len(made) == 2
        assert json.loads(path.read_text())["id"] == second[0]

    asyncio.run(scenario())


# -- a real node ---------------------------------------------------------------------------

def _fleet_toml(fake: LiteLLMAdminFake, port: int, *, register: bool = True) -> str:
    return f"""
[fleet.litellm]
url = "{fake.url}"
master_key_env = "TEST_LITELLM_MASTER"
advertise_url = "http://127.0.0.1:{port}"
register_on_start = {str(register).lower()}
key_rpm = 1000
"""


@pytest.fixture
def fleet_node(tmp_path):
    """Start a real node whose [fleet.litellm] points at the given stand-in; stopped at the end."""
    started = []

    def make(fake: LiteLLMAdminFake, *, register: bool = True):
        d = tmp_path / f"fleetnode{len(started)}"
        d.mkdir()
        port = free_port()
        models = TINY_MODEL.replace('name = "tiny-chat"', 'name = "tiny-chat"\ntpm = 9000\ntags = ["cpu"]')
        cfg = write_config(d, models, port=port, extra=_fleet_toml(fake, port, register=register))
        n = start_node(cfg, {"TEST_LITELLM_MASTER": MASTER})
        started.append(n)
        n.wait_ready()
        return n

    yield make
    for n in started:
        n.stop()


def test_node_registers_restarts_without_duplicates_and_deregisters(fleet_node, fake):
    n = fleet_node(fake)
    try:
        assert wait_until(lambda: len(fake.ids()) == 1, timeout=20), fake.calls
        [dep_id] = fake.ids()
        dep = fake.models[dep_id]
        assert dep_id.startswith("infernode-test-node--tiny-chat--")
        assert dep["litellm_params"]["api_base"] == n.url + "/v1"
        assert dep["litellm_params"]["tpm"] == 9000 and dep["litellm_params"]["tags"] == ["cpu"]
        # The registered key is a real node key, made for the fleet, with its own quota.
        key = dep["litellm_params"]["api_key"]
        models = httpx.get(n.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).json()
        assert models["data"][0]["id"] == "tiny-chat" and "max_model_len" in models["data"][0]
        assert isinstance(models["data"][0]["max_model_len"], int)
        # Client mistakes are 4xx (LiteLLM cools a whole deployment down on 5xx).
        auth = {"authorization": f"Bearer {key}"}
        for body, code in ((b"{not json", 400), (b'{"messages": []}', 400), (b'{"model": "nope", "messages": []}', 404)):
            r = httpx.post(n.url + "/v1/chat/completions", content=body, headers=auth)
            assert r.status_code == code, r.text
            assert r.json()["error"]["message"]
        assert httpx.post(n.url + "/v1/chat/completions", json={}, headers={"authorization": "Bearer sk-bad"}).status_code == 401
        saved = json.loads((n.data_dir / "fleet.key").read_text())
        with n.admin() as c:
            rec = c.get(f"/admin/v1/keys/{saved['id']}").json()
        assert rec["name"] == f"fleet:127.0.0.1:{fake.port}" and rec["rpm"] == 1000
        status = run_cli("fleet", "status", "--json", config=n.config, check=True)
        st = json.loads(status.stdout)
        assert st["registered"] == [dep_id] and st["key_id"] == saved["id"] and st["last_error"] is None

        # The fleet key's own quota shows in x-ratelimit-* headers the proxy can read.
        r = httpx.post(n.url + "/v1/chat/completions", headers=auth, timeout=60,
                       json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "1000", r.headers

        # The model goes away (its worker stops answering: unhealthy, then restarted) and comes back:
        # removed, then registered again. (llama-server restarts in about 0.1 s, within the reconciler's
        # batching of changes, so a plain restart is no longer seen as the model going away.)
        deletes = fake.calls.count(("POST", "/model/delete"))
        [w] = n.workers()
        os.kill(w["pid"], signal.SIGSTOP)
        assert wait_until(lambda: fake.calls.count(("POST", "/model/delete")) > deletes, timeout=30), fake.calls
        assert wait_until(lambda: fake.ids() == [dep_id], timeout=60), fake.ids()

        # Clean shutdown deregisters.
        news = fake.calls.count(("POST", "/model/new"))
        assert n.stop() == 0
        assert fake.ids() == []

        # A restart registers the same id again, once, with the same (reused) fleet key.
        n2 = start_node(n.config, n.env, lock=False)
        try:
            n2.wait_ready()
            assert wait_until(lambda: fake.ids() == [dep_id], timeout=20), fake.ids()
            assert fake.models[dep_id]["litellm_params"]["api_key"] == key
            assert fake.calls.count(("POST", "/model/new")) == news + 1
            # SIGUSR2 (an upgrade: workers left for a successor) keeps the registration.
            assert n2.stop(signal.SIGUSR2) == 0
            assert fake.ids() == [dep_id]
        finally:
            n2.stop()
    finally:
        n.stop()


def test_proxy_down_at_start_then_up(fleet_node, fake):
    fake.stop()
    n = fleet_node(fake)
    try:
        assert wait_until(lambda: json.loads(run_cli("fleet", "status", "--json", config=n.config).stdout or "{}")
                          .get("failures", 0) >= 1, timeout=20)
        fake.start()
        assert wait_until(lambda: len(fake.ids()) == 1, timeout=40), fake.calls
    finally:
        n.stop()
    assert fake.ids() == []


def test_cli_register_deregister_config(fleet_node, fake):
    n = fleet_node(fake, register=False)
    try:
        assert fake.ids() == []
        out = run_cli("fleet", "config", config=n.config, check=True).stdout
        doc = yaml.safe_load(out)
        [entry] = doc["model_list"]
        assert entry["litellm_params"]["model"] == "openai/tiny-chat"
        assert entry["litellm_params"]["api_base"] == n.url + "/v1"
        r = httpx.get(n.url + "/v1/models", headers={"authorization": f"Bearer {entry['litellm_params']['api_key']}"})
        assert r.status_code == 200
        reg = run_cli("fleet", "register", config=n.config, check=True)
        assert entry["model_info"]["id"] in reg.stdout and fake.ids() == [entry["model_info"]["id"]]
        dereg = run_cli("fleet", "deregister", config=n.config, check=True)
        assert "removed 1" in dereg.stdout and fake.ids() == []
        fake.stop()
        failed = run_cli("fleet", "register", config=n.config)
        assert failed.returncode == 1 and "unreachable" in failed.stderr
    finally:
        n.stop()


def test_cli_without_fleet_section(tiny_node):
    p = run_cli("fleet", "config", config=tiny_node.config)
    assert p.returncode == 1 and "[fleet.litellm]" in p.stderr
    st = run_cli("fleet", "status", config=tiny_node.config, check=True)
    assert "fleet: off" in st.stdout


def test_an_on_demand_model_stays_registered_while_it_can_be_loaded(tmp_path, fake):
    """Registered while unloaded, through its loads and idle unloads: no churn in the proxy."""
    port = free_port()
    models = TINY_MODEL.replace('name = "tiny-chat"', 'name = "tiny-chat"\nload = "on_demand"\nidle_unload_s = 1')
    cfg = write_config(tmp_path, models, port=port, extra=_fleet_toml(fake, port))
    n = start_node(cfg, {"TEST_LITELLM_MASTER": MASTER})
    try:
        n.wait_ready()
        assert wait_until(lambda: len(fake.ids()) == 1, timeout=20), fake.calls
        assert n.workers()[0]["state"] == "unloaded"
        [dep_id] = fake.ids()
        key = fake.models[dep_id]["litellm_params"]["api_key"]
        r = httpx.post(n.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
        assert wait_until(lambda: n.workers()[0]["state"] == "unloaded", timeout=30)  # idle again
        assert fake.ids() == [dep_id]
        assert fake.calls.count(("POST", "/model/delete")) == 0
    finally:
        n.stop()
