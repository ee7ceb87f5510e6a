"""Sharing one worker between tenants: a quiet tenant beside a noisy one, shares, and a batch flood.

A real `infernode up` with one llama.cpp worker (the tiny GGUF, one thread) and the
model's `concurrency = 1` (one llama-server slot): one generation at a time, and every
other request waits in the node, in the scheduler's order. Teams: quiet, noisy, s3 (share 3), s1
(share 1), inter; and a key of its own with priority batch. Measured in one run:

- S: one noisy request (256 tokens) alone; the quiet tenant's requests (16 tokens, one
  after another) alone;
- the quiet tenant's median and p90 while the noisy tenant keeps 16 requests in flight,
  against the bounds 1.5 S + 50 ms and 3 S + 50 ms; the noisy tenant's tokens/s then,
  against its tokens/s alone (at least 0.8x);
- two tenants with shares 3 and 1, each keeping 16 requests (64 tokens) in flight: their completion
  tokens' ratio (3 +- 15%);
- an interactive tenant keeping 2 requests (64 tokens) in flight, alone and while the
  batch key keeps 16 requests (256 tokens) in flight: its p90's rise (at most 20%) and the
  batch key's share of the completion tokens (at least [node] batch_min_share, 0.1).

Run: `.venv/bin/python bench/fairness.py [--seconds 15]`. On a shared, busy machine the
absolute times move; the ratios are what the run checks.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import TINY_MODEL, start_node, write_config  # noqa: E402

MODEL = "tiny-chat"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def ask(c: httpx.AsyncClient, key: str, max_tokens: int) -> tuple[float, int]:
    """One chat completion: (seconds, completion tokens)."""
    t0 = time.perf_counter()
    r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                     json={"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": "Tell me a long story about a cat."}]})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


async def flood(c: httpx.AsyncClient, key: str, max_tokens: int, inflight: int, stop: asyncio.Event,
                lat: list[float] | None = None) -> int:
    """Keep `inflight` requests going until stop; the completion tokens of those that ended before it."""
    tokens = 0

    async def loop() -> None:
        nonlocal tokens
        while not stop.is_set():
            s, n = await ask(c, key, max_tokens)
            if not stop.is_set():
                tokens += n
                if lat is not None:
                    lat.append(s)

    tasks = [asyncio.create_task(loop()) for _ in range(inflight)]
    await stop.wait()
    await asyncio.gather(*tasks)
    return tokens


async def timed(seconds: float, *jobs) -> list[int]:
    """Run flood jobs (functions of the stop event) for `seconds`; their token counts."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(j(stop)) for j in jobs]
    await asyncio.sleep(seconds)
    stop.set()
    return list(await asyncio.gather(*tasks))


async def sequential(c: httpx.AsyncClient, key: str, max_tokens: int, n: int) -> list[float]:
    return [(await ask(c, key, max_tokens))[0] for _ in range(n)]


async def measure(url: str, keys: dict[str, str], seconds: float) -> None:
    ms = 1000.0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=200)) as c:
        await ask(c, keys["quiet"], 4)  # warm the worker
        alone_noisy = [(await ask(c, keys["noisy"], 256))[0] for _ in range(5)]
        S = statistics.median(alone_noisy)
        quiet_alone = await sequential(c, keys["quiet"], 16, 20)

        # Quiet beside noisy.
        noisy_alone_tokens = (await timed(seconds, lambda s: flood(c, keys["noisy"], 256, 16, s)))[0]
        stop = asyncio.Event()
        noisy_task = asyncio.create_task(flood(c, keys["noisy"], 256, 16, stop))
        await asyncio.sleep(1.0)  # the flood's line is full
        t0 = time.perf_counter()
        quiet_loaded: list[float] = []
        while time.perf_counter() - t0 < seconds:
            quiet_loaded.append((await ask(c, keys["quiet"], 16))[0])
        noisy_window = time.perf_counter() - t0 + 1.0
        stop.set()
        noisy_loaded_tokens = await noisy_task

        # Shares 3:1.
        s3, s1 = await timed(seconds, lambda s: flood(c, keys["s3"], 64, 16, s),
                             lambda s: flood(c, keys["s1"], 64, 16, s))

        # Interactive under a batch flood.
        inter_alone: list[float] = []
        await timed(seconds, lambda s: flood(c, keys["inter"], 64, 2, s, inter_alone))
        inter_loaded: list[float] = []
        inter_tokens, batch_tokens = await timed(seconds, lambda s: flood(c, keys["inter"], 64, 2, s, inter_loaded),
                                                 lambda s: flood(c, keys["batch"], 256, 16, s))
        alone_after = [(await ask(c, keys["noisy"], 256))[0] for _ in range(5)]

    q_med, q_p90 = statistics.median(quiet_loaded), pct(quiet_loaded, 0.9)
    b_med, b_p90 = 1.5 * S + 0.05, 3 * S + 0.05
    noisy_ratio = (noisy_loaded_tokens / noisy_window) / (noisy_alone_tokens / seconds)
    share_ratio = s3 / s1 if s1 else float("inf")
    rise = pct(inter_loaded, 0.9) / pct(inter_alone, 0.9) - 1
    batch_share = batch_tokens / max(1, batch_tokens + inter_tokens)

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(f"S (one noisy 256-token request alone):   {S * ms:7.1f} ms (median of 5; {statistics.median(alone_after) * ms:.1f} ms "
          f"again at the end; {256 / (noisy_alone_tokens / seconds) * ms:.1f} ms each while 16 were in flight)")
    print(f"quiet alone (16 tokens):                  median {statistics.median(quiet_alone) * ms:6.1f} ms  "
          f"p90 {pct(quiet_alone, 0.9) * ms:6.1f} ms")
    print(f"quiet under 16 noisy in flight:           median {q_med * ms:6.1f} ms (bound {b_med * ms:.1f}: "
          f"{verdict(q_med <= b_med)})  p90 {q_p90 * ms:6.1f} ms (bound {b_p90 * ms:.1f}: {verdict(q_p90 <= b_p90)})  "
          f"n={len(quiet_loaded)}")
    print(f"  = {q_med / statistics.median(quiet_alone):.1f}x quiet alone (median)")
    print(f"noisy throughput beside quiet / alone:    {noisy_ratio:.2f}x  (at least 0.8: {verdict(noisy_ratio >= 0.8)})  "
          f"[{noisy_alone_tokens / seconds:.0f} tok/s alone]")
    print(f"shares 3:1, completion tokens:            {s3} : {s1} = {share_ratio:.2f}  "
          f"(3 +- 15%: {verdict(2.55 <= share_ratio <= 3.45)})")
    print(f"interactive p90 (2 in flight, 64 tokens): alone {pct(inter_alone, 0.9) * ms:.1f} ms, under a batch flood "
          f"{pct(inter_loaded, 0.9) * ms:.1f} ms: {rise * 100:+.1f}% (at most +20%: {verdict(rise <= 0.2)})")
    print(f"batch key's share of completion tokens:   {batch_share:.3f}  (at least 0.1: {verdict(batch_share >= 0.1)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each loaded phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp:
        cfg = write_config(Path(tmp), TINY_MODEL + "concurrency = 1\nmax_queue = 1000\nqueue_timeout_s = 300\n")
        node = start_node(cfg)
        try:
            node.wait_ready(120)
            with node.admin() as a:
                for team, fields in (("quiet", {}), ("noisy", {}), ("s3", {"share": 3}), ("s1", {"share": 1}),
                                     ("inter", {})):
                    a.post("/admin/v1/teams", json={"name": team, **fields}).raise_for_status()
            keys = {t: node.create_key(team=t) for t in ("quiet", "noisy", "s3", "s1", "inter")}
            keys["batch"] = node.create_key(priority="batch")
            asyncio.run(measure(node.url, keys, args.seconds))
        finally:
            node.stop()


if __name__ == "__main__":
    main()
