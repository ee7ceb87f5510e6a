"""Alert webhooks: delivery, HMAC signature, retry with backoff, thresholds, and a real node sending them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from node.accounts.keys import KeyRecord
from node.accounts.storage import UsageRow, open_storage
from node.accounts.teams import TeamRecord
from node.config import AlertsSection
from node.ops.alerts import Alerter, BudgetUse, budget_uses, period_start
from node.workers.gpus import discover
from tests.conftest import free_port, wait_until
from tests.fakes.nvml import FakeGpu, FakeNvml

SECRET = "whsec-test-0123456789"


class Receiver:
    """A local webhook receiver: answers the statuses it is given in turn, then 200; records everything."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict]:
        return [json.loads(b) for _, _, b in self.requests]

    def close(self) -> None:
        self.server.shutdown()


def _run(alerter: Alerter, fn, wait_s: float) -> None:
    async def main() -> None:
        alerter.start()
        t0 = time.perf_counter()
        fn()
        assert time.perf_counter() - t0 < 0.01  # emitting never waits for a receiver
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (not alerter.queue.empty() or alerter._inflight):
            await asyncio.sleep(0.02)
        await alerter.stop(flush_s=0)

    asyncio.run(main())


def test_delivery_is_signed_and_retried_with_backoff():
    rx = Receiver([503, 502])
    try:
        a = Alerter(AlertsSection(webhook_urls=[rx.url]), "box-1", secret=SECRET, backoff_s=0.1)
        _run(a, lambda: a.replica_failed("qwen-0", "qwen", 0, "crash loop: exit 1\nlast lines"), wait_s=10)
    finally:
        rx.close()
    assert len(rx.requests) == 3 and a.delivered == 1 and a.failed == 0
    (t1, h1, b1), (t2, h2, _), (t3, h3, b3) = rx.requests
    assert b1 == b3 and h1["x-infernode-delivery"] == h3["x-infernode-delivery"]  # the same alert, resent
    assert t2 - t1 >= 0.09 and t3 - t2 >= 0.19  # exponential backoff: 0.1 s, then 0.2 s
    expected = "sha256=" + hmac.new(SECRET.encode(), b3, hashlib.sha256).hexdigest()
    assert h3["x-infernode-signature"] == expected
    assert h3["content-type"] == "application/json" and h3["x-infernode-event"] == "replica_failed"
    body = json.loads(b3)
    assert body["event"] == "replica_failed" and body["node"] == "box-1" and body["model"] == "qwen"
    assert body["replica"] == 0 and "crash loop" in body["summary"] and body["severity"] == "critical"
    forged = "sha256=" + hmac.new(b"wrong", b3, hashlib.sha256).hexdigest()
    assert forged != h3["x-infernode-signature"]


def test_refused_alert_is_not_retried_and_unreachable_gives_up():
    rx = Receiver([400])
    dead = f"http://127.0.0.1:{free_port()}/hook"
    try:
        a = Alerter(AlertsSection(webhook_urls=[rx.url, dead]), "box-1", secret=SECRET, backoff_s=0.02, attempts=3)
        _run(a, lambda: a.emit("test", "hello"), wait_s=10)
    finally:
        rx.close()
    assert len(rx.requests) == 1           # 400: the receiver refuses it; no retry
    assert a.failed == 2 and a.delivered == 0


def test_no_webhooks_means_nothing_is_queued():
    a = Alerter(AlertsSection(), "box-1", secret=None)
    a.emit("test", "hello")
    assert not a.enabled and a.queue.empty()


def test_budget_thresholds_fire_once_per_period():
    a = Alerter(AlertsSection(webhook_urls=["http://127.0.0.1:9/x"]), "box-1", secret=SECRET)
    day = period_start("day", time.time())

    def use(used: int, start: float = day) -> list[BudgetUse]:
        return [BudgetUse("key", "key_1", "app", used, 1000, "day", start)]

    def events() -> list[dict]:
        out = []
        while not a.queue.empty():
            out.append(a.queue.get_nowait())
        return out

    a.check_budgets(use(700))
    assert events() == []
    a.check_budgets(use(800))
    [e] = events()
    assert e["event"] == "budget" and e["threshold"] == 0.8 and e["scope"] == "key" and e["used"] == 800
    assert e["scope_id"] == "key_1" and e["name"] == "app" and len(e["id"]) == 32
    a.check_budgets(use(900))
    assert events() == []                     # 80 % already said
    a.check_budgets(use(1000))
    [e] = events()
    assert e["threshold"] == 1.0 and e["severity"] == "critical"
    a.check_budgets(use(5000, start=day + 86400))  # next day, straight past both: only the highest
    [e] = events()
    assert e["threshold"] == 1.0


def test_budget_uses_read_from_the_ledger(tmp_path: Path):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    storage.migrate()
    now = time.time()
    k1 = KeyRecord(id="key_a", name="a", secret_hash="h1", prefix="sk-a", team="ml", budget_tokens=100)
    k2 = KeyRecord(id="key_b", name="b", secret_hash="h2", prefix="sk-b", budget_tokens=50, budget_period="month")
    k3 = KeyRecord(id="key_c", name="c", secret_hash="h3", prefix="sk-c")  # no budget: not watched
    storage.insert_team(TeamRecord(name="ml", budget_tokens=1000))
    rows = [("r1", now, "key_a", "ml", 30, 10), ("r2", now, "key_a", "ml", 5, 5), ("r3", now, "key_b", None, 20, 20),
            ("r4", period_start("month", now) - 10, "key_b", None, 999, 999), ("r5", now, "key_c", "ml", 1, 1)]
    storage.insert_usage([UsageRow(request_id=r, ts=ts, key_id=k, team=t, model="m", endpoint="chat", end_user=None,
                                   prompt_tokens=p, completion_tokens=c, status=200, latency_ms=1.0, ttft_ms=None, cost=0.0)
                          for r, ts, k, t, p, c in rows])
    uses = {(u.scope, u.id): u for u in budget_uses(storage, [k1, k2, k3], now)}
    storage.close()
    assert set(uses) == {("key", "key_a"), ("key", "key_b"), ("team", "ml")}
    assert uses[("key", "key_a")].used == 50 and uses[("key", "key_a")].budget == 100
    assert uses[("key", "key_b")].used == 40 and uses[("key", "key_b")].period == "month"  # last month's row not counted
    assert uses[("team", "ml")].used == 52


def test_gpu_over_temperature_alerts_once_until_it_cools():
    a = Alerter(AlertsSection(webhook_urls=["http://127.0.0.1:9/x"], gpu_temperature_c=85), "box-1", secret=SECRET)
    gpu = FakeGpu("NVIDIA H100 80GB HBM3", 80, temperature_c=70)
    nvml = FakeNvml.with_gpus(gpu)
    temps = [70, 86, 90, 82, 86, 79, 88]
    fired = []
    for t in temps:
        gpu.temperature_c = t
        a.check_gpus(discover(nvml))
        fired.append(a.queue.qsize())
    # 86: alert; 90, 82 (within 5 °C), 86: still the same episode; 79: cooled, re-armed; 88: alert again.
    assert fired == [0, 1, 1, 1, 1, 1, 2]
    first = a.queue.get_nowait()
    assert first["event"] == "gpu_temperature" and first["temperature_c"] == 86 and first["uuid"] == gpu.uuid


def test_node_sends_signed_alerts_for_failed_replica_and_budget(node_factory):
    rx = Receiver()
    try:
        broken = """
[[models]]
name = "broken"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
replicas = 1

[runtimes.llamacpp]
server = "/nonexistent/llama-server"
"""
        extra = f"""
[alerts]
webhook_urls = ["{rx.url}"]
secret_env = "TEST_ALERT_SECRET"
budget_check_s = 0.3
"""
        node = node_factory(broken, extra=extra, env={"TEST_ALERT_SECRET": SECRET}, ready=False)
        assert wait_until(lambda: any(b["event"] == "replica_failed" for b in rx.bodies()), timeout=60), node.log.read_text()[-3000:]
        _, headers, raw = next(r for r in rx.requests if json.loads(r[2])["event"] == "replica_failed")
        assert headers["x-infernode-signature"] == "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        body = json.loads(raw)
        assert body["model"] == "broken" and body["node"] == "test-node" and "not installed" in body["reason"]

        # A budgeted key passing its budget: the node polls the ledger and says so once.
        key_id = None
        with node.admin() as c:
            r = c.post("/admin/v1/keys", json={"name": "budgeted", "budget_tokens": 1000})
            r.raise_for_status()
            key_id = r.json()["id"]
        storage = open_storage(f"sqlite:///{node.data_dir / 'infernode.db'}")
        storage.insert_usage([UsageRow(request_id="x1", ts=time.time(), key_id=key_id, team=None, model="broken",
                                       endpoint="chat", end_user=None, prompt_tokens=600, completion_tokens=250,
                                       status=200, latency_ms=1.0, ttft_ms=None, cost=0.0)])
        storage.close()
        assert wait_until(lambda: any(b["event"] == "budget" for b in rx.bodies()), timeout=20)
        time.sleep(1.0)
        budget = [b for b in rx.bodies() if b["event"] == "budget"]
        assert len(budget) == 1 and budget[0]["scope_id"] == key_id and budget[0]["threshold"] == 0.8
        assert budget[0]["used"] == 850 and budget[0]["budget"] == 1000
    finally:
        rx.close()


def test_money_budgets_use_the_same_thresholds(tmp_path: Path):
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    storage.migrate()
    now = time.time()
    k = KeyRecord(id="key_m", name="m", secret_hash="h1", prefix="sk-m", budget_usd=10.0, budget_tokens=1000)
    onplan = KeyRecord(id="key_p", name="p", secret_hash="h2", prefix="sk-p", plan="gold")
    storage.insert_usage([UsageRow(request_id=f"r{i}", ts=now, key_id=kid, team=None, model="m", endpoint="chat",
                                   end_user=None, prompt_tokens=10, completion_tokens=0, status=200, latency_ms=1.0,
                                   ttft_ms=None, cost=cost) for i, (kid, cost) in enumerate([("key_m", 8.5),
                                                                                            ("key_p", 3.0)])])
    plans = {"gold": (None, 4.0, "month")}
    uses = budget_uses(storage, [k, onplan], now,
                       budgets=lambda scope, r: plans[r.plan] if r.plan else (r.budget_tokens, r.budget_usd,
                                                                              r.budget_period))
    storage.close()
    by = {(u.id, u.unit): u for u in uses}
    assert set(by) == {("key_m", "tokens"), ("key_m", "usd"), ("key_p", "usd")}
    assert by[("key_m", "usd")].used == 8.5 and by[("key_p", "usd")].period == "month"
    a = Alerter(AlertsSection(webhook_urls=["http://127.0.0.1:9/x"]), "box-1", secret=SECRET)
    a.check_budgets(uses)
    fired = []
    while not a.queue.empty():
        fired.append(a.queue.get_nowait())
    [e] = fired                                  # $8.50 of $10: 85 %; $3 of $4: 75 %; 10 of 1000 tokens: 1 %
    assert e["unit"] == "usd" and e["threshold"] == 0.8 and "$8.50 of $10" in e["summary"]
