"""Alert webhooks (`[alerts]`): budgets passing a threshold, replicas failing, hot GPUs.

`Alerter.emit` only puts the alert on a bounded queue, so nothing on the request path
or in the supervisor ever waits on a receiver. A background task posts each alert to
every URL as a JSON body signed with HMAC-SHA256 over the exact bytes sent
(`X-Infernode-Signature: sha256=<hex>`), retrying with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from node import __version__
from node.config import AlertsSection
from node.workers.gpus import Inventory

log = logging.getLogger("infernode.alerts")

SIGNATURE_HEADER = "X-Infernode-Signature"
# A GPU alert re-arms only after the temperature falls this far below the threshold.
TEMPERATURE_HYSTERESIS_C = 5.0


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: sha256=<hex HMAC-SHA256 of the body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return hmac.compare_digest(sign(body, secret), header)


@dataclass(frozen=True)
class BudgetUse:
    """Tokens a key or team has used of its budget in the current period."""

    scope: str            # "key" | "team"
    id: str
    name: str
    used: int
    budget: int
    period: str           # "day" | "month"
    period_start: float


def period_start(period: str, now: float) -> float:
    """Start (UTC) of the budget period containing now."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return start.timestamp()


def budget_uses(storage: Any, keys: Iterable[Any], now: float | None = None) -> list[BudgetUse]:
    """Each budgeted key's and team's tokens this period, from the ledger (blocking: run in a thread)."""
    now = time.time() if now is None else now
    teams = storage.list_teams()
    owners = [("key", k.id, k.name, k) for k in keys if k.budget_tokens and not k.revoked]
    owners += [("team", t.name, t.name, t) for t in teams if t.budget_tokens]
    totals: dict[tuple[str, float], dict[str, int]] = {}
    uses = []
    for scope, ident, name, rec in owners:
        start = period_start(rec.budget_period, now)
        if (scope, start) not in totals:
            rows = storage.usage_report([scope], start, None, None)
            totals[(scope, start)] = {r[scope]: r["prompt_tokens"] + r["completion_tokens"] for r in rows if r[scope]}
        uses.append(BudgetUse(scope, ident, name, totals[(scope, start)].get(ident, 0), int(rec.budget_tokens),
                              rec.budget_period, start))
    return uses


class Alerter:
    """Queues alerts and delivers them; also decides when a condition deserves one."""

    def __init__(self, settings: AlertsSection, node_name: str, *, secret: str | None = None,
                 read_secret: Callable[[], str | None] | None = None,
                 client: httpx.AsyncClient | None = None, attempts: int = 6, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, timeout_s: float = 10.0, queue_size: int = 1000) -> None:
        self.settings = settings
        self.node_name = node_name
        self.secret = secret
        self._read_secret = read_secret
        self.client = client
        self.attempts, self.backoff_s, self.max_backoff_s, self.timeout_s = attempts, backoff_s, max_backoff_s, timeout_s
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._hot: set[str] = set()                        # GPUs currently over temperature
        self._budget_fired: set[tuple[str, str, float, float]] = set()
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.webhook_urls)

    # -- conditions ----------------------------------------------------------------
    def replica_failed(self, replica_id: str, model: str, replica: int, reason: str) -> None:
        """A replica entered `failed` (crash loop, missing runtime, bad store)."""
        self.emit("replica_failed", f"replica {replica_id} failed: {reason.splitlines()[0] if reason else 'unknown'}",
                  model=model, replica=replica, reason=reason[-2000:], severity="critical")

    def check_gpus(self, inventory: Inventory) -> None:
        """Alert once when a GPU passes the temperature threshold; re-arm when it cools."""
        limit = self.settings.gpu_temperature_c
        for g in inventory.gpus:
            if g.temperature_c is None:
                continue
            if g.temperature_c >= limit and g.uuid not in self._hot:
                self._hot.add(g.uuid)
                self.emit("gpu_temperature", f"GPU {g.index} ({g.name}) is at {g.temperature_c:.0f}°C, over {limit:.0f}°C",
                          gpu=g.index, uuid=g.uuid, temperature_c=g.temperature_c, threshold_c=limit, severity="warning")
            elif g.temperature_c < limit - TEMPERATURE_HYSTERESIS_C:
                self._hot.discard(g.uuid)

    def check_budgets(self, uses: Iterable[BudgetUse]) -> None:
        """Alert once per period for each threshold (e.g. 80%, 100%) a key or team passes."""
        uses = list(uses)
        for u in uses:
            if u.budget <= 0:
                continue
            share = u.used / u.budget
            passed = [t for t in sorted(self.settings.budget_thresholds) if share >= t]
            for t in passed:
                mark = (u.scope, u.id, u.period_start, t)
                if mark in self._budget_fired:
                    continue
                self._budget_fired.add(mark)
                if t != passed[-1]:
                    continue  # jumped past several at once: say only the highest
                self.emit("budget", f"{u.scope} {u.name} has used {share:.0%} of its {u.period}ly budget "
                          f"({u.used} of {u.budget} tokens)", scope=u.scope, scope_id=u.id, name=u.name, used=u.used,
                          budget=u.budget, threshold=t, period=u.period,
                          severity="critical" if t >= 1.0 else "warning")
        # Forget marks of past periods so the set stays small.
        current = {u.period_start for u in uses}
        self._budget_fired = {m for m in self._budget_fired if m[2] in current}

    # -- queue and delivery ------------------------------------------------------------
    def emit(self, event: str, summary: str, **details: Any) -> None:
        """Queue an alert (never blocks; the oldest is dropped when the queue is full)."""
        log.warning("alert %s: %s", event, summary)
        if not self.enabled:
            return
        alert = {"id": uuid.uuid4().hex, "event": event, "node": self.node_name,
                 "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                 "summary": summary, **details}
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped += 1
        self.queue.put_nowait(alert)

    def start(self) -> None:
        """Start delivering (reads the signing secret now: construction does no I/O)."""
        if self._task is None and self.enabled:
            if self.secret is None and self._read_secret is not None:
                self.secret = self._read_secret()
            if not self.secret:
                log.warning("[alerts] has webhook_urls but no secret ($%s or secret_file): alerts go unsigned",
                            self.settings.secret_env)
            self._task = asyncio.create_task(self._run(), name="alerts")

    async def watch_budgets(self, read: Callable[[], list[BudgetUse]], interval_s: float) -> None:
        """Poll budget usage (off the request path, `read` runs in a thread) and alert on thresholds."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.check_budgets(await asyncio.to_thread(read))
            except Exception as exc:  # the database may be down for a while; try again next time
                log.warning("budget check failed: %s", exc)

    async def stop(self, flush_s: float = 2.0) -> None:
        """Give queued alerts a moment to go out, then stop."""
        deadline = time.monotonic() + flush_s
        while (not self.queue.empty() or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in [self._task, *self._inflight]:
            if t is not None:
                t.cancel()
        self._task = None

    async def _run(self) -> None:
        own_client = self.client is None
        client = self.client or httpx.AsyncClient()
        try:
            while True:
                alert = await self.queue.get()
                body = json.dumps(alert, separators=(",", ":")).encode()
                for url in self.settings.webhook_urls:
                    # One task per delivery: a slow receiver delays no other alert.
                    t = asyncio.create_task(self.deliver(client, url, body, alert["event"], alert["id"]))
                    self._inflight.add(t)
                    t.add_done_callback(self._inflight.discard)
        finally:
            if own_client:
                await client.aclose()

    async def deliver(self, client: httpx.AsyncClient, url: str, body: bytes, event: str, delivery: str) -> bool:
        """POST one alert; retry on network errors, 429 and 5xx with exponential backoff."""
        headers = {"content-type": "application/json", "user-agent": f"infernode/{__version__}",
                   "x-infernode-event": event, "x-infernode-delivery": delivery}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                r = await client.post(url, content=body, headers=headers, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
                continue
            if r.status_code < 300:
                self.delivered += 1
                return True
            why = f"HTTP {r.status_code}"
            if r.status_code < 500 and r.status_code != 429:
                break  # the receiver refuses this alert; sending it again will not help
        self.failed += 1
        log.error("alert %s to %s not delivered: %s", event, url, why)
        return False
