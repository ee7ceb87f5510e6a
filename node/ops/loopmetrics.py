"""Metric families the gateway writes on every request: plain numbers, no locks.

prometheus_client guards every value with a lock so that any thread may write it; the
gateway bumps eight values per request, always from the event loop, and paid more for
those locks than for its quota checks. These families are written by the event loop
alone and read by a scrape (in a worker thread, which only reads numbers; CPython
reads and copies them whole). They register in a prometheus_client registry, offer the
same `labels(...).inc()/.dec()/.set()/.observe()` calls, and expose the same names and
types as prometheus_client's Counter, Gauge and Histogram.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # `le` is inclusive: amount == bound counts there
        self.sum += amount


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)  # type: ignore[arg-type]  # a collector by duck typing (collect/describe)

    def _new(self) -> object:
        return _Value()

    def labels(self, *values: object):  # -> the child, with the family's write methods
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            child = self._children[key] = self._new()
        return child

    def remove(self, *values: object) -> None:
        del self._children[tuple(str(v) for v in values)]

    def _items(self) -> list[tuple[tuple[str, ...], object]]:
        return list(self._children.items())  # one C call: safe while the loop adds children

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, self.kind)]


class LoopCounter(_Family):
    """A counter (exposed as `<name>_total`)."""

    kind = "counter"

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._items():
            family.add_metric(key, child.value)  # type: ignore[attr-defined]
        yield family


class LoopGauge(_Family):
    kind = "gauge"

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._items():
            family.add_metric(key, child.value)  # type: ignore[attr-defined]
        yield family


class LoopHistogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry, *,
                 buckets: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> object:
        return _Buckets(self.bounds)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._items():
            counts, total = list(child.counts), child.sum  # type: ignore[attr-defined]
            cumulative, running = [], 0
            for le, n in zip(self._les, counts):
                running += n
                cumulative.append((le, running))
            family.add_metric(key, cumulative, total)
        yield family
