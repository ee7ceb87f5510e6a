"""Background sampling: NVML, the request window and the workers' own /metrics.

Everything a scrape or `infernode status` shows about GPUs and workers is read here on
fixed intervals, off the request path: a scrape of the node's `/metrics` only renders
what the last sample left in `Metrics`, and never waits on NVML or a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import httpx

from node.ops.metrics import Metrics, RequestWindow
from node.workers.gpus import Inventory
from node.workers.states import WorkerState

log = logging.getLogger("infernode.sampler")

GPU_INTERVAL_S = 5.0
WINDOW_INTERVAL_S = 1.0
WORKER_SCRAPE_INTERVAL_S = 10.0
WORKER_SCRAPE_TIMEOUT_S = 5.0
MAX_WORKER_METRICS_BYTES = 8 * 1024 * 1024


class ScrapedReplica(Protocol):
    """What the sampler needs of a replica (node/workers/replica.py's Replica has it)."""

    spec: Any
    plan: Any
    state: WorkerState


class Sampler:
    """Owns the background loops; `start` them once, `stop` on shutdown."""

    def __init__(self, metrics: Metrics, *, read_gpus: Callable[[], Inventory],
                 replicas: Callable[[], Iterable[ScrapedReplica]], client: httpx.AsyncClient,
                 on_gpus: Callable[[Inventory], None] = lambda inv: None,
                 gpu_interval_s: float = GPU_INTERVAL_S, window_interval_s: float = WINDOW_INTERVAL_S,
                 scrape_interval_s: float = WORKER_SCRAPE_INTERVAL_S) -> None:
        self.metrics = metrics
        self.read_gpus = read_gpus
        self.replicas = replicas
        self.client = client
        self.on_gpus = on_gpus
        self.gpu_interval_s, self.window_interval_s, self.scrape_interval_s = gpu_interval_s, window_interval_s, scrape_interval_s
        self.window = RequestWindow()
        self.gpus: Inventory | None = None      # the latest NVML sample
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Start the loops (idempotent)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._every(self.gpu_interval_s, self.sample_gpus), name="sample-gpus"),
            asyncio.create_task(self._every(self.window_interval_s, self._tick_window), name="sample-requests"),
            asyncio.create_task(self._every(self.scrape_interval_s, self.scrape_workers), name="scrape-workers"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _every(self, interval: float, step: Callable[[], Any]) -> None:
        # Fixed rate: the next sample is due `interval` after the last one was due, not after it ended.
        due = time.monotonic()
        while True:
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background sample failed (%s)", getattr(step, "__name__", step))
            due += interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() - due > interval:  # fell far behind (a suspended box): start afresh
                due = time.monotonic()

    async def sample_gpus(self) -> None:
        """Read NVML in a thread and publish the sample."""
        inv = await asyncio.to_thread(self.read_gpus)
        self.gpus = inv
        self.metrics.set_gpus(inv)
        self.on_gpus(inv)

    def _tick_window(self) -> None:
        self.window.record(time.time(), *self.metrics.totals())

    async def scrape_workers(self) -> None:
        """Fetch every ready replica's own /metrics (where its runtime has one), concurrently."""
        targets = {}
        for r in self.replicas():
            plan = r.plan
            if r.state is WorkerState.READY and plan is not None and plan.metrics_path:
                targets[(r.spec.model, str(r.spec.replica))] = plan.root_url + plan.metrics_path
        for gone in self.metrics.worker_metric_keys() - set(targets):
            self.metrics.drop_worker_metrics(*gone)
        await asyncio.gather(*(self._scrape(key, url) for key, url in targets.items()))

    async def _scrape(self, key: tuple[str, str], url: str) -> None:
        try:
            r = await self.client.get(url, timeout=WORKER_SCRAPE_TIMEOUT_S)
            if r.status_code != 200:
                raise ValueError(f"HTTP {r.status_code}")
            if len(r.content) > MAX_WORKER_METRICS_BYTES:
                raise ValueError(f"{len(r.content)} bytes is more than the node re-exposes")
            # Parsing a big exposition is CPU work: do it beside the event loop, not on it.
            await asyncio.to_thread(self.metrics.set_worker_metrics, *key, r.text)
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("scrape of %s failed: %s", url, exc)
            self.metrics.drop_worker_metrics(*key, failed=True)
