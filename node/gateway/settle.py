"""Settle: an admitted request's accounts, exactly once: quota charge, cost, metrics, ledger row, access log.

The quota charge may come early: a stream charges before the client sees its end, so the
client's next request already counts those tokens (`Settlement.charge`, called by relay).
Everything else happens when the request is over (`Settlement.close`, called once by the
gateway whatever happened), and the cost is computed once, for the model that served it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from node.accounts.ledger import Ledger
from node.accounts.quotas import Admission
from node.accounts.storage import UsageRow
from node.gateway.exchange import Exchange, ModelInfo
from node.ops.logs import access as access_log
from node.ops.metrics import Metrics, ModelSeries


class Books:
    """Where settlements go: the metrics (one series per configured model) and the ledger."""

    def __init__(self, metrics: Metrics, ledger: Ledger) -> None:
        self.metrics, self.ledger = metrics, ledger
        self._series: dict[str, ModelSeries] = {}

    def series(self, model: str) -> ModelSeries:
        """The model's request-path metric series (made on first use)."""
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = ModelSeries(self.metrics, model)
        return series

    def open(self, ex: Exchange, adm: Admission, models: Mapping[str, ModelInfo]) -> Settlement:
        """The settlement of a request just admitted (rate admission counts it from here)."""
        return Settlement(self, ex, adm, models)


class Settlement:
    """One admitted request's accounts."""

    __slots__ = ("books", "ex", "adm", "models", "cost", "charged")

    def __init__(self, books: Books, ex: Exchange, adm: Admission, models: Mapping[str, ModelInfo]) -> None:
        self.books, self.ex, self.adm, self.models = books, ex, adm, models
        self.cost = 0.0
        self.charged = False

    def charge(self) -> None:
        """Charge the quotas with the request's tokens and their cost (the first call only)."""
        if self.charged:
            return
        self.charged = True
        ex = self.ex
        info = self.models.get(ex.model)  # the model that served it: its prices
        if info is not None:
            self.cost = (max(0, ex.prompt_tokens) * info.price_input + max(0, ex.completion_tokens) * info.price_output) / 1e6
        self.adm.finish(ex.prompt_tokens, ex.completion_tokens, cost=self.cost)

    def close(self) -> None:
        """The request is over: charge (unless done), count metrics, queue the ledger row, write the access log line."""
        self.charge()
        ex = self.ex
        latency = time.perf_counter() - ex.started
        ttft = ex.first_token_at - ex.started if ex.first_token_at is not None else None
        if ex.model in self.models:  # a configured model: its series (never a label a client made up)
            m = self.books.series(ex.model)
            m.requests(ex.status).inc()
            m.duration.observe(latency)
            if ttft is not None and ex.stream:
                m.ttft.observe(ttft)
            if ex.prompt_tokens:
                m.prompt.inc(ex.prompt_tokens)
            if ex.completion_tokens:
                m.completion.inc(ex.completion_tokens)
        # Positional (UsageRow's field order): keyword calls cost the request path a few µs.
        self.books.ledger.record(UsageRow(ex.rid, time.time(), ex.key_id, ex.team, ex.model, ex.endpoint, ex.user,
                                          ex.prompt_tokens, ex.completion_tokens, ex.status, latency * 1000,
                                          ttft * 1000 if ttft is not None else None, self.cost, ex.api, ex.client_rid))
        access_log(ex.client_rid or ex.rid, ex.model, ex.key_id, ex.status, latency, ex.endpoint, ttft,
                   ex.prompt_tokens, ex.completion_tokens)
