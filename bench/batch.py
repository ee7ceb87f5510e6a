"""Batch jobs on the real llama.cpp worker: throughput, interactive latency, and a restart, in one run.

1. Throughput: the same N chat requests sent straight to the worker by `--concurrency` clients
   (nothing else running), then as one N-line batch through the node; the ratio is the direct
   run's time over the batch's (create to completed, validation included).
2. Interactive latency: `--probes` one-at-a-time requests through the node alone, then the same
   while an N-line batch runs; the ratio of the p90s. `--probe-gap` spaces them out (a person
   at a chat window rather than a script).
3. A restart mid-batch (SIGTERM, start again): lines recorded before the stop, lines run twice
   (ledger rows per line beyond one), lines missing from the output.

Run: `.venv/bin/python bench/batch.py [--lines 1000] [--tokens 16] [--concurrency 8] [--yield-s S] [--probe-gap S]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import TINY_MODEL, start_node, write_config  # noqa: E402


def body(i: int, tokens: int) -> dict:
    return {"model": "tiny-chat", "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"request {i}"}]}


def jsonl(n: int, tokens: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body(i, tokens)}).encode() + b"\n" for i in range(n))


def run_batch(http: httpx.Client, n: int, tokens: int, wait: bool = True) -> tuple[str, float]:
    t0 = time.monotonic()
    f = http.post("/v1/files", files={"file": ("in.jsonl", io.BytesIO(jsonl(n, tokens)))}, data={"purpose": "batch"})
    f.raise_for_status()
    b = http.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"}).json()
    if not wait:
        return b["id"], 0.0
    return b["id"], finish(http, b["id"], t0)


def finish(http: httpx.Client, bid: str, t0: float, timeout: float = 1800) -> float:
    while time.monotonic() - t0 < timeout:
        b = http.get(f"/v1/batches/{bid}").json()
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            assert b["status"] == "completed", b
            return time.monotonic() - t0
        time.sleep(0.1)
    raise SystemExit(f"batch {bid} did not finish in {timeout}s")


def direct(worker: str, n: int, tokens: int, concurrency: int) -> float:
    with httpx.Client(base_url=worker, timeout=120) as c, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.monotonic()
        for r in pool.map(lambda i: c.post("/v1/chat/completions", json=body(i, tokens)), range(n)):
            r.raise_for_status()
        return time.monotonic() - t0


def probes(http: httpx.Client, k: int, tokens: int, gap: float = 0.0, batch: str | None = None) -> list[float]:
    """k interactive requests, one after another (`gap` apart); with `batch`, only while it runs."""
    out = []
    for i in range(k):
        time.sleep(gap)
        if batch is not None and http.get(f"/v1/batches/{batch}").json()["status"] != "in_progress":
            break
        t0 = time.monotonic()
        http.post("/v1/chat/completions", json=body(10_000 + i, tokens)).raise_for_status()
        out.append(time.monotonic() - t0)
    return out


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--probe-gap", type=float, default=0.0,
                    help="seconds between interactive probes (0: one after another)")
    ap.add_argument("--yield-s", type=float, default=None,
                    help="[node] batch_yield_s (default: the node's; 0: batch takes any free slot)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = write_config(Path(d), TINY_MODEL, extra=f"[batches]\nconcurrency = {a.concurrency}\n")
        if a.yield_s is not None:
            cfg.write_text(cfg.read_text().replace("[node]\n", f"[node]\nbatch_yield_s = {a.yield_s}\n", 1))
        node = start_node(cfg)
        try:
            node.wait_ready()
            key = node.create_key()
            [w] = node.workers()
            worker = f"http://127.0.0.1:{w['port']}"
            http = httpx.Client(base_url=node.url, headers={"authorization": f"Bearer {key}"}, timeout=120)
            print(f"load average {os.getloadavg()[0]:.1f}; {a.lines} lines of {a.tokens} tokens, "
                  f"{a.concurrency} at once", flush=True)
            t_direct = direct(worker, a.lines, a.tokens, a.concurrency)
            _, t_batch = run_batch(http, a.lines, a.tokens)
            print(f"throughput: direct {a.lines / t_direct:.1f} req/s, batch {a.lines / t_batch:.1f} req/s: "
                  f"{t_direct / t_batch:.2f}x direct (target >= 0.8)", flush=True)
            alone = probes(http, a.probes, a.tokens, a.probe_gap)
            bid, _ = run_batch(http, a.lines, a.tokens, wait=False)
            while http.get(f"/v1/batches/{bid}").json()["status"] == "validating":
                time.sleep(0.01)
            during = probes(http, a.probes, a.tokens, a.probe_gap, bid)
            finish(http, bid, time.monotonic())
            if len(during) < 2:
                raise SystemExit(f"the batch ended after {len(during)} probes: give it more --lines")
            preempted = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(node.url + "/metrics").text.splitlines()
                            if line.startswith('infernode_batch_lines_total{result="preempted"}'))
            print(f"interactive p90: alone {p90(alone) * 1000:.1f} ms, during a batch {p90(during) * 1000:.1f} ms "
                  f"({len(during)} probes; {preempted:.0f} batch lines preempted): "
                  f"{p90(during) / p90(alone):.2f}x (target <= 1.2)", flush=True)
            n = min(a.lines, 300)
            bid, _ = run_batch(http, n, a.tokens * 4, wait=False)
            while http.get(f"/v1/batches/{bid}").json()["request_counts"]["completed"] < n // 5:
                time.sleep(0.05)
            node.stop(signal.SIGTERM)
        finally:
            node.stop()
        db = Path(d) / "data" / "infernode.db"
        with sqlite3.connect(db) as c:
            before = c.execute("SELECT COUNT(*) FROM batch_lines WHERE batch_id = ?", (bid,)).fetchone()[0]
        again = start_node(cfg, lock=False)
        try:
            again.wait_ready()
            http = httpx.Client(base_url=again.url, headers={"authorization": f"Bearer {key}"}, timeout=120)
            finish(http, bid, time.monotonic())
            out = http.get(f"/v1/files/{http.get(f'/v1/batches/{bid}').json()['output_file_id']}/content").content
        finally:
            again.stop()
        ids = [json.loads(x)["custom_id"] for x in out.splitlines()]
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT client_request_id, COUNT(*) FROM usage WHERE client_request_id LIKE ? "
                             "AND status = 200 GROUP BY client_request_id", (f"{bid}-%",)).fetchall()
        twice = sum(1 for _, k in rows if k > 1)
        missing = n - len(set(ids))
        # A line answered twice would have two 200 rows; lines in flight at the stop were cancelled (499).
        print(f"restart mid-batch: {before} of {n} lines recorded before the stop; after it {len(ids)} output lines, "
              f"{missing} missing, {twice} lines answered twice (target: 0 and 0)", flush=True)


if __name__ == "__main__":
    main()
