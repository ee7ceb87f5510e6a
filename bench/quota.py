"""Auth + quota benchmark with 10,000 keys: the cost per request in microseconds, and memory.

Two parts:
1. in process: a KeyRing and Quotas holding 10,000 keys (rpm, tpm, a daily budget,
   1,000 teams with their own limits, end-user limits on a tenth of the keys); each
   request is `KeyRing.lookup` (SHA-256 + dict + constant-time compare) +
   `Quotas.admit` + `Admission.finish`, on a random key. Reports mean/p50/p99 us
   and the bytes the ring and counters hold (tracemalloc).
2. a real `infernode up` (the stub worker of tests/fakes as an `external` model):
   RSS with no keys, with 10,000 keys loaded, and after traffic spread over all of
   them (every key's counters filled), plus requests/s through the node.

Run: `.venv/bin/python bench/quota.py [--requests 200000] [--node-requests 20000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import free_port, rss_mb, wait_http  # noqa: E402
from node.accounts.keys import KeyRecord, KeyRing, hash_secret, new_key_id, new_secret  # noqa: E402
from node.accounts.plans import PlanRecord  # noqa: E402
from node.accounts.quotas import Quotas  # noqa: E402
from node.accounts.storage import open_storage  # noqa: E402
from node.accounts.teams import TeamRecord  # noqa: E402
from node.gateway.upstream import Pool  # noqa: E402

N_KEYS = 10_000


PLANS = {f"plan{i}": PlanRecord(name=f"plan{i}", models=("group:all",), rpm=100_000, tpm=10**9, max_parallel=1000,
                                 budget_tokens=10**11, budget_usd=10.0**9) for i in range(20)}
GROUPS = {"all": ("m", "m2", "m3")}


def make_keys(n: int, plans: bool = False) -> tuple[list[KeyRecord], list[str], list[TeamRecord]]:
    """Keys with limits of their own, or (plans) every other key on one of 20 plans with a money budget."""
    teams = [TeamRecord(name=f"team{i}", rpm=1_000_000, tpm=10**10, budget_tokens=10**12) for i in range(n // 10)]
    records, secrets = [], []
    for i in range(n):
        s = new_secret()
        secrets.append(s)
        if plans and i % 2:
            own = {"plan": f"plan{i % len(PLANS)}"}
        else:
            own = {"rpm": 100_000, "tpm": 10**9, "max_parallel": 1000, "budget_tokens": 10**11}
        records.append(KeyRecord(id=new_key_id(), name=f"k{i}", secret_hash=hash_secret(s), prefix=s[:8],
                                 team=f"team{i % len(teams)}", user_rpm=1000 if i % 10 == 0 else None, **own))
    return records, secrets, teams


def make_quotas(teams: list[TeamRecord], plans: bool) -> Quotas:
    quotas = Quotas()
    quotas.set_teams(teams, PLANS if plans else None, GROUPS if plans else None)
    if plans:
        quotas.set_prices({"m": (0.15, 0.6)})
    return quotas


def traffic(requests: int) -> tuple[list[int], list[str]]:
    rng = random.Random(1)
    return [rng.randrange(N_KEYS) for _ in range(requests)], [f"user{rng.randrange(100)}" for _ in range(requests)]


def in_process(requests: int, plans: bool = False) -> dict:
    """Time auth + admit + finish per request; then, in a second pass under tracemalloc, memory."""
    records, secrets, teams = make_keys(N_KEYS, plans)
    order, users = traffic(requests)
    ring, quotas = KeyRing(records), make_quotas(teams, plans)
    perf = time.perf_counter_ns
    timings = []
    cpu0 = time.process_time()
    t_all = perf()
    for i, u in zip(order, users):
        t0 = perf()
        quotas.admit(ring.lookup(secrets[i]), "m", u).finish(20, 30)
        timings.append(perf() - t0)
    total = perf() - t_all
    cpu = time.process_time() - cpu0
    timings.sort()
    out = {"keys": N_KEYS, "requests": requests, "mean_us": total / requests / 1000,
           "cpu_us": cpu / requests * 1e6,
           "p50_us": timings[len(timings) // 2] / 1000, "p99_us": timings[int(len(timings) * 0.99)] / 1000}
    del ring, quotas, records, teams
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    records, secrets2, teams = make_keys(N_KEYS, plans)   # the records themselves count too
    secrets[:] = secrets2
    ring, quotas = KeyRing(records), make_quotas(teams, plans)
    loaded = tracemalloc.get_traced_memory()[0]
    now = time.time()
    for n, (i, u) in enumerate(zip(order, users)):
        # Spread over 59 s of simulated time, so every admission is still in its window.
        quotas.admit(ring.lookup(secrets[i]), "m", u, now=now + n * 59 / requests).finish(20, 30, now=now + n * 59 / requests)
    filled = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    out.update(ring_mb=(loaded - before) / 2**20, counters_mb=(filled - loaded) / 2**20, counters=len(quotas),
               bytes_per_request=(filled - loaded) / requests)
    return out


async def drive(base: str, secrets: list[str], total: int, concurrency: int) -> tuple[float, int]:
    pool = Pool(read_timeout=60)
    body = json.dumps({"model": "stub-model", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4}).encode()
    done = errors = 0
    it = iter(range(total))

    async def one() -> None:
        nonlocal done, errors
        for i in it:
            headers = (("content-type", "application/json"), ("authorization", f"Bearer {secrets[i % len(secrets)]}"))
            resp = await pool.request("POST", base, "/chat/completions", body, headers)
            async for _ in resp.chunks():
                pass
            resp.close()
            done += 1
            errors += resp.status != 200
    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    await pool.aclose()
    return done / (time.perf_counter() - t), errors


def through_node(node_requests: int) -> dict:
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="infernode-qbench-"))
    stub_port, node_port = free_port(), free_port()
    stub = subprocess.Popen([py, "-m", "tests.fakes.openai_worker", "--port", str(stub_port), "--no-record",
                             "--chunks", "4"], cwd=REPO)
    (work / "appliance.toml").write_text(f"""
[node]
listen = "127.0.0.1:{node_port}"
data_dir = "data"

[[models]]
name = "stub-model"
runtime = "external"
url = "http://127.0.0.1:{stub_port}/v1"
max_inflight = 256
""")
    cfg = str(work / "appliance.toml")
    subprocess.run([py, "-m", "node", "lock", "--config", cfg], check=True, cwd=REPO, capture_output=True)
    url = f"http://127.0.0.1:{node_port}"
    out: dict = {}

    def up() -> subprocess.Popen:
        p = subprocess.Popen([py, "-m", "node", "up", "--config", cfg], cwd=REPO,
                             stdout=(work / "node.log").open("ab"), stderr=subprocess.STDOUT)
        wait_http(url + "/readyz")
        time.sleep(1.0)
        return p

    try:
        node = up()
        out["rss_no_keys_mb"] = rss_mb(node.pid)[0]
        node.send_signal(signal.SIGTERM)
        node.wait(30)
        records, secrets, teams = make_keys(N_KEYS)
        storage = open_storage(f"sqlite:///{work / 'data' / 'infernode.db'}")
        for t in teams:
            storage.insert_team(t)
        for r in records:
            storage.insert_key(r)
        storage.close()
        node = up()
        out["rss_10k_keys_mb"] = rss_mb(node.pid)[0]
        out["rps_10k_keys"], out["errors"] = asyncio.run(drive(url + "/v1", secrets, node_requests, 32))
        out["rss_after_traffic_mb"], out["rss_peak_mb"] = rss_mb(node.pid)
        node.send_signal(signal.SIGTERM)
        node.wait(30)
    finally:
        stub.terminate()
        stub.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--node-requests", type=int, default=20_000)
    ap.add_argument("--skip-node", action="store_true")
    ap.add_argument("--plans", action="store_true", help="half the keys on plans (model groups, money budgets)")
    args = ap.parse_args()
    r = in_process(args.requests, args.plans)
    print(f"load average {Path('/proc/loadavg').read_text().split()[0]} on {os.cpu_count()} cores")
    print(f"in process, {r['keys']} keys, {r['requests']} requests on random keys (with teams and end users"
          f"{', half on 20 plans with money budgets' if args.plans else ''}):")
    print(f"  auth + admit + finish: CPU {r['cpu_us']:.2f} us/request (robust to a busy machine); wall mean {r['mean_us']:.2f} us, p50 {r['p50_us']:.2f} us, p99 {r['p99_us']:.2f} us")
    print(f"  memory: 10,000 keys and 1,000 teams {r['ring_mb']:.1f} MiB; counters with all {r['requests']} requests inside the "
          f"one-minute window {r['counters_mb']:.1f} MiB ({r['counters']} scopes, "
          f"{r['bytes_per_request']:.0f} B per request in the window)")
    if args.skip_node:
        return
    n = through_node(args.node_requests)
    print(f"real node (stub worker, {args.node_requests} requests over all keys, concurrency 32):")
    print(f"  RSS: no keys {n['rss_no_keys_mb']:.0f} MB; 10,000 keys {n['rss_10k_keys_mb']:.0f} MB; "
          f"after traffic {n['rss_after_traffic_mb']:.0f} MB (peak {n['rss_peak_mb']:.0f} MB)")
    print(f"  {n['rps_10k_keys']:.0f} req/s, {n['errors']} errors")


if __name__ == "__main__":
    main()
