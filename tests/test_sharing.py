"""Sharing a model between tenants on a real node: the real llama.cpp worker (concurrency 1, so every
other request waits in the node), fair order, bounded waiting, the queue's views; and priorities passed
down to vLLM's per-request `priority` (the vLLM stand-in; the real CPU build is not installed here)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TINY_MODEL, run_cli, wait_until

FAKE_PYTHON = Path(__file__).resolve().parent / "fakes" / "bin" / "python"


def metric(node, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(node.url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def ask(c: httpx.AsyncClient, key: str, max_tokens: int, **headers: str) -> tuple[float, httpx.Response]:
    r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}", **headers},
                     json={"model": "tiny-chat", "max_tokens": max_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": "Tell me a story."}]})
    return time.monotonic(), r


def test_a_quiet_tenant_goes_ahead_of_a_noisy_backlog(node_factory):
    node = node_factory(TINY_MODEL + "concurrency = 1\n")
    with node.admin() as a:
        for team in ("quiet", "noisy"):
            assert a.post("/admin/v1/teams", json={"name": team}).status_code == 201
    noisy, quiet = node.create_key(team="noisy"), node.create_key(team="quiet")

    async def main():
        async with httpx.AsyncClient(base_url=node.url, timeout=120) as c:
            flood = [asyncio.create_task(ask(c, noisy, 600)) for _ in range(8)]
            # The worker takes one at a time: the rest of the flood waits in the node.
            assert await asyncio.to_thread(wait_until, lambda: metric(
                node, "infernode_queue_depth", model="tiny-chat", priority="interactive") >= 5, 30, 0.01)
            admin = {"authorization": f"Bearer {node.admin_key}"}
            [m] = (await c.get("/admin/v1/queue", headers=admin)).json()["data"]  # (async: the flood's clock runs on)
            assert m["model"] == "tiny-chat" and m["inflight"] == 1
            assert m["waiting"][0]["tenant"] == "noisy" and m["waiting"][0]["waiting"] >= 3
            pending = m["waiting"][0]["waiting"]
            quiet_done, r = await ask(c, quiet, 4)
            assert r.status_code == 200
            ends = sorted(t for t, resp in await asyncio.gather(*flood) if resp.status_code == 200)
            assert len(ends) == 8
            # Quiet waited for the request in service at most, not for the noisy backlog (one may have
            # started between the look at the queue and quiet's arrival).
            assert sum(1 for t in ends if t > quiet_done) >= pending - 1
        assert metric(node, "infernode_team_inflight", model="tiny-chat", team="noisy") == 0

    asyncio.run(main())
    assert metric(node, "infernode_queue_wait_seconds_count", model="tiny-chat", priority="interactive") >= 9
    assert metric(node, "infernode_queue_depth", model="tiny-chat", priority="interactive") == 0
    cli = run_cli("queue", config=node.config, env={"INFERNODE_ADMIN_KEY": node.admin_key})
    assert cli.returncode == 0 and "nothing waits" in cli.stdout


def test_bounded_waiting_and_clients_that_leave(node_factory):
    node = node_factory(TINY_MODEL + "concurrency = 1\nmax_queued = 2\nqueue_timeout_s = 1.5\n")
    key = node.create_key()
    other = node.create_key()

    async def main():
        async with httpx.AsyncClient(base_url=node.url, timeout=120) as c:
            busy = asyncio.create_task(ask(c, other, 1900))  # holds the one slot for a while
            assert await asyncio.to_thread(wait_until, lambda: metric(
                node, "infernode_team_inflight", model="tiny-chat", team="none") == 1, 30, 0.01)
            waiting = [asyncio.create_task(ask(c, key, 1900)) for _ in range(2)]
            await asyncio.to_thread(wait_until, lambda: metric(node, "infernode_queue_depth", model="tiny-chat") == 2,
                                    10, 0.01)
            _, refused = await ask(c, key, 4)  # a third from the same tenant: over its max_queued
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "tenant_queue_full"
            assert int(refused.headers["retry-after"]) >= 1
            # A client that goes away leaves the line at once.
            gone = asyncio.create_task(ask(c, other, 4))
            await asyncio.to_thread(wait_until, lambda: metric(node, "infernode_queue_depth", model="tiny-chat") == 3, 10)
            gone.cancel()
            await asyncio.to_thread(wait_until, lambda: metric(node, "infernode_queue_depth", model="tiny-chat") == 2, 10)
            # The waiters' deadline passes while the long request holds the slot: 503 with Retry-After.
            for _, r in await asyncio.gather(*waiting):
                if r.status_code != 200:  # (one may get the slot if the long request ended early)
                    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
                    assert int(r.headers["retry-after"]) >= 1
            _, r = await busy
            assert r.status_code == 200

    asyncio.run(main())
    assert metric(node, "infernode_queue_depth", model="tiny-chat") == 0


def test_a_stream_whose_client_leaves_gives_its_slot_back(node_factory):
    """The slot is held while the stream runs; a client leaving frees it and stops the worker's generation."""
    node = node_factory(TINY_MODEL + "concurrency = 1\n")
    key = node.create_key()
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "tiny-chat", "max_tokens": 1500, "temperature": 0, "messages": [{"role": "user", "content": "go"}]}
    with httpx.Client(base_url=node.url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", headers=auth, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the response (the client leaving early)
            assert next(lines).startswith("data: ")
            assert wait_until(lambda: metric(node, "infernode_team_inflight", model="tiny-chat", team="none") == 1, 5)
        # Closed mid-stream: the node frees the slot and closes its upstream connection, which stops the worker.
        assert wait_until(lambda: metric(node, "infernode_team_inflight", model="tiny-chat", team="none") == 0, 10)
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", headers=auth, json={**body, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hello"}]})
        quick_s = time.monotonic() - t0
        assert r.status_code == 200
        t0 = time.monotonic()
        whole = c.post("/v1/chat/completions", headers=auth, json=body)
        full_s = time.monotonic() - t0
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] > 1000
        # Had the worker gone on generating, the short request would have waited for most of the 1500 tokens.
        assert quick_s < full_s / 2, (quick_s, full_s)


def test_shares_and_priorities_through_the_admin_api_and_cli(node_factory):
    node = node_factory(TINY_MODEL, extra='[plans.bulk]\nshare = 0.5\npriority = "batch"\n')
    with node.admin() as a:
        for bad in ({"share": 0}, {"share": -1}, {"share": "x"}, {"share": float("inf")}, {"share": 1e9},
                    {"priority": "urgent"}, {"priority": 1}, {"priority": "batch\udc80"}):
            r = a.post("/admin/v1/keys", content=json.dumps({"name": "k", **bad}),  # a lone surrogate as \udc80
                       headers={"content-type": "application/json"})
            assert r.status_code in (400, 422), (bad, r.text)
        r = a.post("/admin/v1/teams", json={"name": "t", "share": 4, "priority": "batch"})
        assert r.status_code == 201 and r.json()["share"] == 4 and r.json()["priority"] == "batch"
        assert a.patch("/admin/v1/teams/t", json={"share": 2}).json()["share"] == 2
        assert a.get("/admin/v1/plans/bulk").json()["share"] == 0.5
        for bad in ("limit=0", "limit=1000000", "limit=x", "model=nope"):
            assert a.get(f"/admin/v1/queue?{bad}").status_code in (404, 422), bad
    env = {"INFERNODE_ADMIN_KEY": node.admin_key}
    made = run_cli("keys", "create", "--name", "b", "--share", "3", "--priority", "batch", "--json",
                   config=node.config, env=env)
    assert made.returncode == 0, made.stderr
    kid = json.loads(made.stdout)["id"]
    with node.admin() as a:
        rec = a.get(f"/admin/v1/keys/{kid}").json()
        assert rec["share"] == 3 and rec["priority"] == "batch"
    upd = run_cli("keys", "update", kid, "--priority", "interactive", config=node.config, env=env)
    assert upd.returncode == 0 and '"priority": "interactive"' in upd.stdout
    bad = run_cli("keys", "update", kid, "--share", "zero", config=node.config, env=env)
    assert bad.returncode == 2


VLLM = f"""
[[models]]
name = "v"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
args = ["--scheduling-policy", "priority"]

[[models]]
name = "w"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"

[runtimes.vllm]
python = "{FAKE_PYTHON}"
"""


def test_priorities_reach_vllm_when_it_schedules_by_them(node_factory):
    node = node_factory(VLLM)
    inter, batch = node.create_key(), node.create_key(priority="batch")

    def chat(key: str, model: str, **kw) -> None:
        client = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0, timeout=30)
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kw)

    log = node.data_dir / "logs" / "v-0.log"
    chat(inter, "v")
    chat(batch, "v")
    chat(inter, "v", extra_headers={"x-infernode-priority": "batch"})       # lowered by the request
    chat(batch, "v", extra_headers={"x-infernode-priority": "interactive"})  # never raised
    chat(inter, "v", extra_body={"priority": -100})                          # a client's own value is replaced
    r = httpx.post(node.url + "/v1/chat/completions", headers=[("authorization", f"Bearer {inter}"),
                   ("x-infernode-priority", b"\xff\xfe batch" * 100)],  # not UTF-8, not a band: ignored
                   json={"model": "v", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 200
    def seen(path: Path) -> list[str]:  # the worker's log lines reach the file a moment after its answers
        return [line.rsplit("=", 1)[1] for line in path.read_text().splitlines() if "generation request priority=" in line]

    assert wait_until(lambda: len(seen(log)) == 6, 10)
    assert seen(log) == ["0", "1", "1", "1", "0", "0"]
    # Without --scheduling-policy priority the field is not sent (vLLM would refuse a batch request's 1).
    chat(batch, "w")
    w_log = node.data_dir / "logs" / "w-0.log"
    assert wait_until(lambda: seen(w_log) == ["0"], 10), w_log.read_text()[-2000:]


def test_a_models_concurrency_reaches_vllm(node_factory):
    node = node_factory(VLLM.replace('args = ["--scheduling-policy", "priority"]', "concurrency = 3"))
    assert "'max_num_seqs': 3" in (node.data_dir / "logs" / "v-0.log").read_text()
    assert "'max_num_seqs': None" in (node.data_dir / "logs" / "w-0.log").read_text()  # vLLM's own default
