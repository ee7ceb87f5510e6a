"""Prometheus metrics of the node (prefix `infernode_`); no per-key labels.

Besides its own families the node re-exposes each worker's `/metrics` (scraped in the
background by node/ops/sampler.py), relabelled with `model` and `replica`, so that one
scrape target covers the whole box. Rendering never does I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from node import __version__
from node.ops.loopmetrics import LoopCounter, LoopGauge, LoopHistogram
from node.workers.gpus import Inventory

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Rejections the gateway also counts in infernode_requests_total (refused after admission, code 429).
ANSWERED_REJECTIONS = frozenset({"model_capacity"})
# Labels the node adds to a worker's samples; a worker's own label of that name is kept as exported_<name>.
WORKER_LABELS = ("model", "replica")


class Metrics:
    """Every metric family the node exports, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("infernode_build", "Build information of the node.", registry=r).info({"version": __version__})
        # Written by the gateway on every request, from the event loop only: lock-free families.
        self.requests = LoopCounter("infernode_requests", "Requests answered, by model and HTTP status.",
                                    ["model", "code"], r)
        self.duration = LoopHistogram("infernode_request_duration_seconds", "Request duration as the node saw it.",
                                      ["model"], r, buckets=LATENCY_BUCKETS)
        self.ttft = LoopHistogram("infernode_time_to_first_token_seconds", "Time to the first streamed token.",
                                  ["model"], r, buckets=TTFT_BUCKETS)
        self.tokens = LoopCounter("infernode_tokens", "Tokens processed, by kind (prompt|completion).",
                                  ["model", "kind"], r)
        self.inflight = LoopGauge("infernode_inflight_requests", "Requests in flight to workers.", ["model"], r)
        # The scheduler's (node/gateway/scheduler.py): waiting requests, their waits, slots held per team.
        self.queue_depth = LoopGauge("infernode_queue_depth", "Requests waiting for a slot, by model and priority.",
                                     ["model", "priority"], r)
        self.queue_wait = LoopHistogram("infernode_queue_wait_seconds", "Time requests waited for a slot (0 when one was free).",
                                        ["model", "priority"], r, buckets=LATENCY_BUCKETS)
        self.team_inflight = LoopGauge("infernode_team_inflight", "Requests holding a slot, by model and team "
                                       "(\"none\": keys without a team; past 32 teams a model's others are \"other\").",
                                       ["model", "team"], r)
        self.worker_up = Gauge("infernode_worker_up", "1 when the replica is ready.", ["model", "replica", "runtime"], registry=r)
        self.worker_restarts = Counter("infernode_worker_restarts", "Replica restarts after a failure.", ["model", "replica"], registry=r)
        self.quota_rejections = Counter("infernode_quota_rejections", "Requests refused by a quota or limit.", ["reason"], registry=r)
        # Every /v1 request the node refused itself, by why (REFUSAL_REASONS); rate-limit refusals are
        # also in infernode_quota_rejections_total with their finer reason.
        self.refused = LoopCounter("infernode_requests_refused", "Requests the node refused (4xx it made), by reason.",
                                   ["reason"], r)
        self.ledger_stats: Callable[[], Mapping[str, Any]] | None = None  # set once the ledger runs
        r.register(_LedgerCollector(self))
        self.batch_lines = Counter("infernode_batch_lines", "Batch lines by result: completed|failed (recorded), "
                                   "preempted (stopped for interactive traffic, sent again).",
                                   ["result"], registry=r)
        self.batch_counts: Callable[[], Mapping[str, int]] | None = None  # batches by status, read at scrape time
        r.register(_BatchCollector(self))
        gpu = ["gpu", "uuid"]
        self.gpu_memory_used = Gauge("infernode_gpu_memory_used_bytes", "GPU memory in use (NVML).", gpu, registry=r)
        self.gpu_memory_total = Gauge("infernode_gpu_memory_total_bytes", "GPU memory in all (NVML).", gpu, registry=r)
        self.gpu_utilization = Gauge("infernode_gpu_utilization_ratio", "GPU busy time over NVML's last sample period, 0..1.",
                                     gpu, registry=r)
        self.gpu_temperature = Gauge("infernode_gpu_temperature_celsius", "GPU core temperature (NVML).", gpu, registry=r)
        self.gpu_power = Gauge("infernode_gpu_power_watts", "GPU power draw (NVML).", gpu, registry=r)
        self.gpu_sample_time = Gauge("infernode_gpu_last_sample_timestamp_seconds",
                                     "When NVML was last read (the sampler runs in the background).", registry=r)
        self.worker_scrape_up = Gauge("infernode_worker_metrics_up",
                                      "1 when the node's last scrape of the worker's own /metrics succeeded.",
                                      ["model", "replica"], registry=r)
        # Models on demand (node/workers/loader.py).
        self.model_loaded = Gauge("infernode_model_loaded", "1 when the model has a ready replica.", ["model"], registry=r)
        self.model_loads = Counter("infernode_model_loads", "Loads of on-demand models, by what asked (request|admin).",
                                   ["model", "reason"], registry=r)
        self.model_load_seconds = Histogram("infernode_model_load_seconds",
                                            "Seconds from a load's start to a ready replica (a wake from sleep included).",
                                            ["model"], registry=r, buckets=LOAD_BUCKETS)
        self.model_evictions = Counter("infernode_model_evictions", "On-demand models unloaded to make room for another.",
                                       ["model"], registry=r)
        self._workers: dict[tuple[str, str], list[Metric]] = {}

    # -- written by the background sampler ---------------------------------------
    def set_gpus(self, inventory: Inventory, now: float | None = None) -> None:
        """Replace the per-GPU gauges with one NVML sample (GPUs that vanished disappear)."""
        gauges = (self.gpu_memory_used, self.gpu_memory_total, self.gpu_utilization, self.gpu_temperature, self.gpu_power)
        seen: dict[Gauge, set[tuple[str, str]]] = {g: set() for g in gauges}
        for gpu in inventory.gpus:
            labels = (str(gpu.index), gpu.uuid)
            values = (gpu.memory_used, gpu.memory_total, gpu.utilization, gpu.temperature_c, gpu.power_w)
            for gauge, value in zip(gauges, values):
                if value is not None:  # unsupported on this GPU: no sample rather than a false zero
                    gauge.labels(*labels).set(value)
                    seen[gauge].add(labels)
        # Remove only what vanished (a scrape rendering in another thread never sees the gauges empty).
        for gauge, keep in seen.items():
            for gone in _label_sets(gauge) - keep:
                gauge.remove(*gone)
        self.gpu_sample_time.set(time.time() if now is None else now)

    def set_worker_metrics(self, model: str, replica: str, text: str) -> None:
        """Keep one worker's scraped exposition, relabelled, until the next scrape (safe from a thread)."""
        self._workers[(model, replica)] = relabel(text, model, replica)
        self.worker_scrape_up.labels(model, replica).set(1)

    def drop_worker_metrics(self, model: str, replica: str, *, failed: bool = False) -> None:
        """Forget a worker's samples (it stopped, or its scrape failed)."""
        self._workers.pop((model, replica), None)
        if failed:
            self.worker_scrape_up.labels(model, replica).set(0)
        else:
            try:
                self.worker_scrape_up.remove(model, replica)
            except KeyError:
                pass

    def worker_metric_keys(self) -> set[tuple[str, str]]:
        return set(self._workers)

    # -- read ----------------------------------------------------------------------
    def totals(self) -> tuple[float, float, float]:
        """(answered requests + quota rejections, 5xx answers, quota rejections) since start."""
        requests = errors = 0.0
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    requests += s.value
                    if s.labels.get("code", "").startswith("5"):
                        errors += s.value
        rejected = unanswered = 0.0
        for family in self.quota_rejections.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    rejected += s.value
                    if s.labels.get("reason") not in ANSWERED_REJECTIONS:
                        unanswered += s.value  # refused before admission: not in requests_total
        return requests + unanswered, errors, rejected

    def collect(self) -> Iterator[Metric]:
        """The node's families with the workers' merged in (one block per family name)."""
        merged: dict[str, Metric] = {f.name: f for f in self.registry.collect()}
        copied: set[str] = set()  # never extend the registry's own objects
        for families in list(self._workers.values()):  # a snapshot: the sampler may replace entries meanwhile
            for family in families:
                have = merged.get(family.name)
                if have is not None and have.type != family.type:
                    continue  # a same-named family of another type cannot share the name
                if family.name not in copied:
                    merged[family.name] = have = _copy(have) if have is not None else _copy(family, samples=False)
                    copied.add(family.name)
                assert have is not None
                have.samples.extend(family.samples)
        yield from merged.values()

    def render(self) -> bytes:
        return generate_latest(self)


# infernode_requests_refused_total{reason}: a fixed set, never a client's words.
REFUSAL_REASONS = {401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                   408: "timeout", 413: "too_large", 429: "rate_limited", 431: "too_large", 503: "not_ready"}


def refusal_reason(status: int, code: str | None) -> str:
    """The label a refusal is counted under (400s split: an over-context request or other bad input)."""
    if status == 400:
        return "context_length" if code == "context_length_exceeded" else "invalid_request"
    return REFUSAL_REASONS.get(status, "other")


class _BatchCollector:
    """infernode_batches{status}: batches by status, read from the database at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily("infernode_batches", "Batches by status.", labels=["status"])]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("infernode_batches", "Batches by status.", labels=["status"])
        counts = self.metrics.batch_counts
        if counts is not None:
            try:
                for status, n in sorted(counts().items()):
                    family.add_metric([status], float(n))
            except Exception:  # the database is away: the scrape still answers
                pass
        yield family


class _LedgerCollector:
    """infernode_ledger_*: the usage ledger's health, read from the ledger at scrape time (nothing on the request path)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        stats = self.metrics.ledger_stats
        if stats is not None:
            yield from self._families(stats())

    @staticmethod
    def _families(st: Mapping[str, Any]) -> Iterator[Metric]:
        def gauge(name: str, doc: str, key: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=float(st[key])) if st else GaugeMetricFamily(name, doc)

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=float(st[key])) if st else CounterMetricFamily(name, doc)

        yield gauge("infernode_ledger_rows_queued", "Ledger rows in memory, waiting to be written.", "queued")
        yield counter("infernode_ledger_rows_written", "Ledger rows written to the database.", "written")
        yield counter("infernode_ledger_rows_spilled", "Ledger rows written to the spill file while the database was away.",
                      "spilled")
        yield counter("infernode_ledger_rows_dropped", "Ledger rows lost: the queue or the spill file was full.", "dropped")
        yield gauge("infernode_ledger_spill_bytes", "Size of the spill file awaiting replay.", "spill_bytes")
        yield counter("infernode_ledger_write_failures", "Ledger writes the database refused or could not take.",
                      "write_failures")
        yield counter("infernode_ledger_rows_quarantined", "Ledger rows the database refused alone: kept in the "
                      "quarantine file, a made-safe copy written.", "quarantined")
        yield gauge("infernode_ledger_database_up", "1 when the ledger's last write reached the database.", "database_up")


def _label_sets(gauge: Gauge) -> set[tuple[str, ...]]:
    """The label values a labelled gauge has children for."""
    return {tuple(s.labels[n] for n in ("gpu", "uuid")) for f in gauge.collect() for s in f.samples}


def _copy(family: Metric, samples: bool = True) -> Metric:
    out = Metric(family.name, family.documentation, family.type, family.unit)
    out.samples = list(family.samples) if samples else []
    return out


def relabel(text: str, model: str, replica: str) -> list[Metric]:
    """Parse a worker's Prometheus text and add model/replica labels to every sample.

    A label the worker already sets under one of those names is kept as
    `exported_<name>`, as Prometheus does with `honor_labels: false`. Untyped `_created`
    series (prometheus_client's creation timestamps) are dropped as noise.
    """
    out = []
    for family in text_string_to_metric_families(text):
        if family.type == "unknown" and family.name.endswith("_created"):
            continue
        doc = family.documentation or "Exported by the worker (it gave no help text)."
        m = Metric(family.name, doc, family.type, family.unit)
        for s in family.samples:
            labels = dict(s.labels)
            for name in WORKER_LABELS:
                if name in labels:
                    labels[f"exported_{name}"] = labels.pop(name)
            labels["model"], labels["replica"] = model, replica
            m.samples.append(s._replace(labels=labels, timestamp=None, exemplar=None))
        out.append(m)
    return out


@dataclass(frozen=True)
class Traffic:
    """Requests of the last minute, for `infernode status`."""

    window_s: float
    requests: int
    errors: int
    rejected: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"window_s": round(self.window_s, 1), "requests": self.requests, "errors": self.errors,
                "rejected": self.rejected, "requests_per_s": round(self.requests_per_s, 3),
                "error_rate": round(self.error_rate, 4)}


class RequestWindow:
    """A 60 s ring of one-second snapshots of the request counters (cheap, in memory).

    The sampler records the counters' totals once a second, so the request path pays
    nothing; the last minute's counts are the difference between the newest and the
    oldest snapshot.
    """

    def __init__(self, span_s: int = 60) -> None:
        self._snaps: deque[tuple[float, float, float, float]] = deque(maxlen=span_s + 1)

    def record(self, now: float, requests: float, errors: float, rejected: float) -> None:
        self._snaps.append((now, requests, errors, rejected))

    def traffic(self) -> Traffic:
        if len(self._snaps) < 2:
            return Traffic(0.0, 0, 0, 0)
        t0, r0, e0, j0 = self._snaps[0]
        t1, r1, e1, j1 = self._snaps[-1]
        return Traffic(t1 - t0, int(r1 - r0), int(e1 - e0), int(j1 - j0))


def exported_names(families: Iterable[Metric]) -> set[str]:
    """Every series name a set of families produces (counters' _total, histograms' _bucket...)."""
    names: set[str] = set()
    for f in families:
        for s in f.samples:
            names.add(s.name)
        names.add(f.name + "_total" if f.type == "counter" else f.name + "_info" if f.type == "info" else f.name)
        if f.type == "histogram":
            names.update({f.name + "_bucket", f.name + "_sum", f.name + "_count"})
    return names


class ModelSeries:
    """One model's metric children, looked up once rather than per request."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model
        self.duration = metrics.duration.labels(model)
        self.ttft = metrics.ttft.labels(model)
        self.prompt = metrics.tokens.labels(model, "prompt")
        self.completion = metrics.tokens.labels(model, "completion")
        self.inflight = metrics.inflight.labels(model)
        self._by_status: dict[int, Any] = {}

    def requests(self, status: int) -> Any:
        c = self._by_status.get(status)
        if c is None:
            c = self._by_status[status] = self.metrics.requests.labels(self.model, str(status))
        return c
