"""Prometheus metrics of the node (prefix `infernode_`); no per-key labels."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector, generate_latest,
)

from node import __version__

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every metric family the node exports, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("infernode_build", "Build information of the node.", registry=r).info({"version": __version__})
        self.requests = Counter("infernode_requests", "Requests answered, by model and HTTP status.", ["model", "code"], registry=r)
        self.duration = Histogram("infernode_request_duration_seconds", "Request duration as the node saw it.",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("infernode_time_to_first_token_seconds", "Time to the first streamed token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("infernode_tokens", "Tokens processed, by kind (prompt|completion).", ["model", "kind"], registry=r)
        self.inflight = Gauge("infernode_inflight_requests", "Requests in flight to workers.", ["model"], registry=r)
        self.worker_up = Gauge("infernode_worker_up", "1 when the replica is ready.", ["model", "replica", "runtime"], registry=r)
        self.worker_restarts = Counter("infernode_worker_restarts", "Replica restarts after a failure.", ["model", "replica"], registry=r)
        self.quota_rejections = Counter("infernode_quota_rejections", "Requests refused by a quota or limit.", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
