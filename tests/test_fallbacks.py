"""Fallbacks: a request its model cannot take (overloaded, not ready, a worker failing before
any byte) is served by the next fallback the key may use; the answer, the ledger and the
metrics name the model that served it. The fallback is a real llama.cpp worker."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.conftest import TINY_MODEL, free_port, wait_until
from tests.fakes import openai_worker


def ext(name: str, port: int, extra: str = "") -> str:
    return f"""
[[models]]
name = "{name}"
runtime = "external"
url = "http://127.0.0.1:{port}/v1"
fallbacks = ["tiny-chat"]
{extra}
"""


def post(n, key: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    return httpx.post(n.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                      timeout=120)


def test_fallbacks_on_overload_not_ready_and_a_dead_worker(node_factory) -> None:
    busy_port, broken_port = free_port(), free_port()
    busy = openai_worker.start(busy_port, "--model", "busy")
    broken = openai_worker.start(broken_port, "--model", "broken", "--drop-posts")
    try:
        toml = (TINY_MODEL + "price_input = 1000.0\nprice_output = 1000.0\n"
                + ext("busy", busy_port, "max_inflight = 1\nmax_queue = 0\n")
                + ext("down", free_port()) + ext("broken", broken_port))
        n = node_factory(toml, ready=False)

        def ready() -> bool:
            try:
                states = {w["model"]: w["state"] for w in n.workers()}
            except (httpx.HTTPError, KeyError, OSError):
                return False
            return all(states.get(m) == "ready" for m in ("tiny-chat", "busy", "broken"))
        assert wait_until(ready, timeout=120), n.workers()
        key = n.create_key(name="all")

        # Not ready: `down` never came up.
        r = post(n, key, "down")
        assert r.status_code == 200 and r.headers["x-infernode-model"] == "tiny-chat", r.text
        # Overloaded: `busy` holds one request and queues none.
        held: list[httpx.Response] = []
        t = threading.Thread(target=lambda: held.append(post(n, key, "busy", stub={"delay_s": 3})))
        t.start()
        time.sleep(1.0)
        r = post(n, key, "busy")
        assert r.status_code == 200 and r.headers["x-infernode-model"] == "tiny-chat", r.text
        t.join()
        assert held[0].status_code == 200 and held[0].headers["x-infernode-model"] == "busy"
        # A worker that fails before any byte of its answer.
        r = post(n, key, "broken")
        assert r.status_code == 200 and r.headers["x-infernode-model"] == "tiny-chat", r.text

        # A key that may not use the fallback gets the model's own refusal.
        only = n.create_key(name="only", models=["down", "busy"])
        r = post(n, only, "down")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        t = threading.Thread(target=lambda: post(n, only, "busy", stub={"delay_s": 2}))
        t.start()
        time.sleep(1.0)
        r = post(n, only, "busy")
        assert r.status_code == 429 and r.json()["error"]["code"] == "model_overloaded"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        t.join()

        with n.admin() as c:
            rows = [json.loads(x) for x in c.get("/admin/v1/usage/requests", params={"format": "jsonl"}).text.splitlines()]
        served = sorted(r["model"] for r in rows if r["status"] == 200)
        assert served == ["busy", "busy", "tiny-chat", "tiny-chat", "tiny-chat"]
        assert all(r["cost"] > 0 for r in rows if r["model"] == "tiny-chat")   # the fallback's prices
        metrics = httpx.get(n.url + "/metrics").text
        assert 'infernode_requests_total{code="200",model="tiny-chat"} 3.0' in metrics or \
            'infernode_requests_total{model="tiny-chat",code="200"} 3.0' in metrics, \
            [line for line in metrics.splitlines() if line.startswith("infernode_requests_total")]
    finally:
        for p in (busy, broken):
            p.kill()
            p.wait()
