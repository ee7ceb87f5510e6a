"""The running node: every service wired together, started and stopped in order.

Constructing a `Node` does no I/O; `start` opens the database, loads keys, checks
and pulls the store, places and launches workers; `shutdown` drains and stops them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import httpx

import runtimes
from node import __version__
from node.accounts.ledger import Ledger, rebuild_counters
from node.accounts.quotas import Quotas
from node.accounts.reports import Reports
from node.accounts.service import Accounts
from node.accounts.storage import Storage, StorageUnavailable, open_storage
from node.accounts.tokens import ensure_admin_key
from node.batches.api import BatchApi
from node.batches.build import build_batches
from node.batches.service import Batches
from node.config import Config, load_config
from node.console.sessions import SignedIn
from node.errors import AuthenticationError, NoReadyReplica, OperationFailed
from node.gateway.exchange import ModelInfo
from node.gateway.gateway import Gateway
from node.gateway.scheduler import Scheduler
from node.gateway.tenancy import Tenancy
from node.gateway.upstream import Pool
from node.ops.alerts import Alerter, budget_uses
from node.ops.logs import ACCESS_LOGGER
from node.ops.membership import Membership
from node.ops.metrics import Metrics
from node.ops.sampler import Sampler
from node.supply.lockfile import LockFile, read_lock
from node.supply.modelcard import ModelCard, card
from node.supply.pull import pull_entries
from node.supply.store import Store
from node.workers.gpus import Inventory, discover
from node.workers.handles import claim_workers
from node.workers.keeper import owner_token
from node.workers.loader import Loader
from node.workers.replica import Replica
from node.workers.router import Router
from node.workers.states import WorkerState
from node.workers.supervisor import Supervisor

log = logging.getLogger("infernode.node")


class Node:
    def __init__(self, config: Config, *, nvml: Any = None) -> None:
        self.config = config
        self.nvml = nvml
        self.metrics = Metrics()
        self.quotas = Quotas()
        self.accounts = Accounts(config, self.quotas)
        self.keys = self.accounts.keys          # the gateway's view: the ring the service keeps current
        self.reports = Reports(lambda: self.accounts.storage, self._flush_ledger)
        self.router = Router(m.name for m in config.models)
        self.store = Store(config.data_dir / "store")
        self.storage: Storage | None = None
        self.ledger: Ledger | None = None
        self.lock = LockFile()
        self.cards: dict[str, ModelCard] = {}  # what each pinned model is (Ollama's listings), read at start and reload
        self.inventory = Inventory(())
        self.supervisor: Supervisor | None = None
        self.loader: Loader | None = None
        self.gateway: Gateway | None = None
        self.batch_api: BatchApi | None = None   # OpenAI's Files and Batches API (node/batches/)
        self.admin_key = ""
        self.started_at = time.time()
        self.startup_error: str | None = None
        self.starting = True
        self._tasks: list[asyncio.Task] = []
        self._reload_lock = asyncio.Lock()
        self.membership = Membership(config, self.accounts, self.ready_models)   # the LiteLLM fleet
        # idle_expiry under uvicorn's 5 s keep-alive (vLLM, SGLang): a pooled connection is dropped
        # before its worker closes it, so a POST is rarely written into a closing connection.
        self.upstream = Pool(connect_timeout=5.0, read_timeout=600.0, max_idle=256, idle_expiry=4.0)
        self.probe_client = httpx.AsyncClient(limits=httpx.Limits(max_connections=64))
        self.alerts = Alerter(config.alerts, config.node.name,
                              read_secret=lambda: config.secret(config.alerts.secret_env, config.alerts.secret_file))
        self.sampler = Sampler(self.metrics, read_gpus=lambda: discover(self.nvml), client=self.probe_client,
                               replicas=lambda: self.supervisor.replicas.values() if self.supervisor else (),
                               on_gpus=self.alerts.check_gpus)

    def model_infos(self) -> dict[str, ModelInfo]:
        return {m.name: ModelInfo.of(m) for m in self.config.models}

    def prices(self) -> dict[str, tuple[float, float]]:
        return {m.name: (m.price_input, m.price_output) for m in self.config.models}

    def _model_format(self, name: str) -> str:
        """The weights' file format of a model, as its runtime's adapter lays it out ('' when it pins none)."""
        m = self.config.model(name)
        layout = runtimes.get(m.runtime).LAYOUT if m is not None else None
        return layout.file_format if layout is not None else ""

    def _read_cards(self, lock: LockFile) -> dict[str, ModelCard]:
        """Each pinned model's card, from its locked files in the store (file reads: call off the loop)."""
        return {m.name: card(entry, self.store.blob_path) for m in self.config.models
                if (entry := lock.entry(m.name)) is not None}

    def build_gateway(self, ledger: Ledger) -> Gateway:
        return Gateway(
            keys=self.keys, quotas=self.quotas, router=self.router, ledger=ledger, metrics=self.metrics,
            models=self.model_infos(), client=self.upstream,
            format_of=self._model_format, card_of=lambda name: self.cards.get(name),
            log_prompts=self.config.node.log_prompts, ensure_loaded=self.ensure_loaded,
            scheduler=Scheduler(self.router, slots_of=lambda target: target.concurrency,
                                tenancy=Tenancy(self.quotas), batch_min_share=self.config.node.batch_min_share,
                                batch_yield_s=self.config.node.batch_yield_s,
                                metrics=self.metrics),
        )

    async def ensure_loaded(self, model: str) -> None:
        """The gateway's seam to on-demand loading: return once `model` is ready, else NoReadyReplica."""
        if self.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        await self.loader.ensure_loaded(model)

    def _busy(self, model: str) -> bool:
        """Whether the gateway has requests for `model` in flight or queued (then it is not evicted)."""
        return self.gateway is not None and self.gateway.busy(model)

    def _build_loader(self, supervisor: Supervisor) -> Loader:
        m = self.metrics
        return Loader(supervisor, read_gpus=lambda: discover(self.nvml), busy=self._busy,
                      on_load=lambda model, reason: m.model_loads.labels(model, reason).inc(),
                      on_loaded=lambda model, s: m.model_load_seconds.labels(model).observe(s),
                      on_evict=lambda model: m.model_evictions.labels(model).inc())

    # -- start -----------------------------------------------------------------
    async def open(self) -> None:
        """What must work before the API answers: admin key, database, keys."""
        logging.getLogger(ACCESS_LOGGER).disabled = not self.config.node.access_log
        self.admin_key, generated = ensure_admin_key(self.config)
        if generated:
            log.warning("no admin key was set; generated one in %s", self.config.admin_key_path)
        self.quotas.set_prices(self.prices())
        self.storage = open_storage(self.config.database_url())
        await asyncio.to_thread(self.storage.migrate)
        await self.accounts.open(self.storage, self.admin_key)
        # Before the gateway exists: a restart must reset neither a rate window nor a budget.
        rows = await asyncio.to_thread(rebuild_counters, self.storage, self.quotas, time.time())
        log.info("quota counters rebuilt from the ledger (%d rows in the last minute)", rows)
        self.ledger = Ledger(self.storage, spill_path=self.config.data_dir / "ledger.spill",
                             quarantine_path=self.config.data_dir / "ledger.quarantine.jsonl")
        self.ledger.start()
        self.metrics.ledger_stats = self.ledger.stats
        self._tasks.append(asyncio.create_task(self._keys_loop(), name="keys-refresh"))
        self.gateway = self.build_gateway(self.ledger)
        self.batch_api = build_batches(self.config, self.storage, self.gateway, self.keys, self.quotas, self.metrics)
        self.sampler.start()
        self.alerts.start()
        if self.alerts.enabled:
            storage = self.storage
            self._tasks.append(asyncio.create_task(self.alerts.watch_budgets(
                lambda: budget_uses(storage, self.keys.all(), budgets=self.accounts.budgets_of),
                self.config.alerts.budget_check_s), name="budget-alerts"))

    async def start_workers(self) -> None:
        """Check and pull the store, place and launch (or adopt) workers."""
        # Claim the workers an earlier node left at once: pulling and re-hashing the store
        # below can outlast their keepers' adopt_grace_s.
        claim_workers(self.config.data_dir / "run" / "workers", owner_token())
        try:
            self.lock = read_lock(self.config.lock_path)
            self.inventory = await asyncio.to_thread(discover, self.nvml)
            if self.config.node.pull_on_start:
                await self._pull_missing()
            self.cards = await asyncio.to_thread(self._read_cards, self.lock)
            self.supervisor = Supervisor(self.config, self.lock, self.store, self.inventory, self.router,
                                         self.probe_client, on_change=self._replica_changed)
            self.loader = self._build_loader(self.supervisor)
            await self.supervisor.verify_store()
            await self.supervisor.reconcile(adopt=True)
        except Exception as exc:  # keep serving /readyz with the reason
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")
        finally:
            self.starting = False
        if self.batch_api is not None:  # resume what a previous run left, now that workers start
            await self.batch_api.batches.runner.start()
        if self.config.fleet.litellm is not None:
            await self.membership.start(register=self.config.fleet.litellm.register_on_start)

    def ready_models(self) -> list[str]:
        """Models the node serves now: ready ones, and on-demand ones while they can be loaded."""
        sup = self.supervisor
        return [m for m in self.router.models() if self.router.ready(m) or (sup is not None and sup.loadable(m))]

    async def _pull_missing(self) -> None:
        jobs = []
        for m in self.config.models:
            entry = self.lock.entry(m.name)
            if entry is None or not m.launched or entry.source != m.source:
                continue
            if self.store.missing(entry):
                log.info("pulling %s (%d bytes)", m.name, entry.total_size)
                jobs.append((entry, m))
        if not jobs:
            return
        try:  # every model at once, under the pull's one connection limit
            results = await asyncio.to_thread(pull_entries, self.store, jobs, self.config)
        except Exception as exc:
            log.error("pull failed: %s", exc)
            return
        for (entry, _), res in zip(jobs, results):
            if isinstance(res, BaseException):
                log.error("pull of %s failed: %s", entry.name, res)

    def _replica_changed(self, replica: Replica) -> None:
        labels = (replica.spec.model, str(replica.spec.replica), replica.spec.runtime)
        self.metrics.worker_up.labels(*labels).set(1 if replica.state is WorkerState.READY else 0)
        if self.supervisor is not None:
            model = replica.spec.model
            up = any(r.spec.model == model and r.state is WorkerState.READY for r in self.supervisor.replicas.values())
            self.metrics.model_loaded.labels(model).set(1 if up else 0)
        if replica.state is WorkerState.RESTARTING and replica.restarts:
            self.metrics.worker_restarts.labels(replica.spec.model, str(replica.spec.replica)).inc()
        if replica.state is WorkerState.FAILED:
            self.alerts.replica_failed(replica.id, replica.spec.model, replica.spec.replica, replica.last_error)
        self.membership.poke()
        log.info("replica %s %s%s", replica.id, replica.state.value,
                 f": {replica.last_error.splitlines()[0]}" if replica.last_error and replica.state is not WorkerState.READY else "")

    async def reload(self) -> dict[str, Any]:
        """Re-read appliance.toml and models.lock; restart only the replicas whose spec changed."""
        async with self._reload_lock:
            if self.supervisor is None:
                raise OperationFailed("the node is still starting; reload again once it is up")
            config = await asyncio.to_thread(load_config, self.config.path)
            lock = await asyncio.to_thread(read_lock, config.lock_path)
            notes = []
            if config.node != self.config.node:  # the port and data dir are held by this process
                notes.append("[node] changes take effect at the next restart")
                config = config.model_copy(update={"node": self.config.node})
            self.config, self.lock = config, lock
            self.membership.reconfigure(config)
            self.quotas.set_prices(self.prices())
            self.accounts.configure(config)
            if self.gateway is not None:
                self.gateway.set_models(self.model_infos())
            if config.node.pull_on_start:
                await self._pull_missing()
            self.cards = await asyncio.to_thread(self._read_cards, lock)
            summary = await self.supervisor.reload(config, lock)
            log.info("reloaded %s: %s", config.path, summary)
            return {**summary, "notes": notes}

    # -- keys ------------------------------------------------------------------
    async def _keys_loop(self) -> None:
        """Poll the settings version every 0.5 s, so a change on any node applies within a second."""
        ticks = 0
        while True:
            await asyncio.sleep(0.5)
            ticks += 1
            if ticks % 60 == 0:
                self.quotas.sweep()
            try:
                await self.accounts.refresh()
            except StorageUnavailable as exc:
                if ticks % 20 == 1:
                    log.warning("key refresh failed (keys stay as they were): %s", exc)

    def identify(self, secret: str) -> SignedIn | None:
        """Who a console sign-in is: an admin token (the bootstrap key included) or an API key in good standing."""
        tokens = self.accounts.tokens
        who = tokens.principal(secret)
        if who is not None:
            record = tokens.get(who.id)
            name = record.name if record is not None else "admin key"
            return SignedIn("admin", who.role.label, who.id, name, who.team, secret)
        try:
            key = self.keys.lookup(secret)
        except AuthenticationError:
            return None   # revoked or expired
        if key is None:
            return None
        return SignedIn("key", "key", key.id, key.name, key.team, secret)

    def _flush_ledger(self) -> None:
        """Write the ledger's pending rows (before a report reads the database)."""
        if self.ledger is not None:
            self.ledger.flush()

    # -- operations: what the admin API may do (node/admin/facade.py) -------------
    def status(self) -> dict[str, Any]:
        """The node, its models, workers, GPUs, traffic and ledger, as `infernode status` shows them."""
        ok, reasons = self.readiness()
        return {
            "node": {"name": self.config.node.name, "listen": self.config.node.listen, "version": __version__,
                     "uptime_s": round(time.time() - self.started_at, 1), "ready": ok, "reasons": reasons,
                     "keys": len(self.keys)},
            "models": [{"name": m.name, "runtime": m.runtime, "load": m.load} for m in self.config.models],
            "workers": self.workers(),
            "gpus": self.gpus(),
            "traffic": self.sampler.window.traffic().as_dict(),
            "ledger": self.ledger.stats() if self.ledger is not None else None,
        }

    def queue(self, team: str | None, model: str | None, limit: int) -> list[dict[str, Any]]:
        """Each model's slots in use and who waits (at most `limit` rows a model, the longest lines first).

        With `team` (a team token) only that team's line: tenants are team names, or key:ID for keys without one.
        """
        gates = self.gateway.schedule.gates if self.gateway is not None else {}
        data = []
        for name, q in gates.items():
            if model is not None and name != model:
                continue
            if team is None:
                rows, queued = q.waiting(limit), q.queued
            else:
                rows = [w for w in q.waiting(1 << 30) if w["tenant"] == team][:limit]
                queued = sum(w["waiting"] for w in rows)
            data.append({"model": name, "inflight": q.inflight, "queued": queued, "waiting": rows})
        return data

    def workers(self) -> list[dict[str, Any]]:
        sup = self.supervisor
        return [dataclasses.asdict(x.status()) for x in sup.replicas.values()] if sup else []

    def worker_log(self, replica_id: str) -> Path | None:
        replica = self.supervisor.replicas.get(replica_id) if self.supervisor else None
        return replica.log_path if replica is not None else None

    def gpus(self) -> dict[str, Any]:
        inv = self.sampler.gpus or self.inventory  # the background sampler's latest NVML reading
        return {"driver": inv.driver, "error": inv.error, "data": [g.as_dict() for g in inv.gpus]}

    def config_path(self) -> str:
        return str(self.config.path)

    def has_model(self, name: str) -> bool:
        return self.config.model(name) is not None

    def batch_jobs(self) -> Batches | None:
        return self.batch_api.batches if self.batch_api is not None else None

    def restart_model(self, name: str) -> int:
        return self.supervisor.restart_model(name) if self.supervisor else 0

    async def load_model(self, name: str) -> float:
        if self.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        return await self.loader.load(name)

    async def unload_model(self, name: str) -> int:
        if self.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        return await self.loader.unload(name)

    def fleet_proxy(self) -> str | None:
        return self.membership.proxy()

    def fleet_status(self) -> dict[str, Any]:
        return self.membership.status()

    async def fleet_register(self) -> dict[str, Any]:
        return await self.membership.register()

    async def fleet_deregister(self) -> int:
        return await self.membership.deregister()

    async def fleet_deployments(self) -> tuple[str, bool, list[dict[str, Any]]]:
        return await self.membership.deployments()

    # -- state -----------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        if self.gateway is not None and self.gateway.draining:
            return False, ["the node is shutting down"]
        if self.startup_error:
            return False, [f"start-up failed: {self.startup_error}"]
        if self.supervisor is None:
            return False, ["starting: checking the store and launching workers"]
        return self.supervisor.readiness()

    async def drain(self, grace: float) -> None:
        """Stop admitting and wait (up to grace seconds) for in-flight requests."""
        if self.gateway is None:
            return
        self.gateway.draining = True
        deadline = time.monotonic() + grace
        while self.gateway.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def shutdown(self, *, detach: bool = False) -> None:
        """Stop (or, with detach, leave for adoption) the workers; flush the ledger."""
        for t in self._tasks:
            t.cancel()
        if self.batch_api is not None:  # lines in flight are not recorded: the next start runs them again
            await self.batch_api.batches.runner.close()
        await self.membership.stop(detach=detach)  # leave the fleet before the workers go
        if self.supervisor is not None:
            if detach:
                await self.supervisor.detach_all()
            else:
                await self.supervisor.stop_all()
        await self.sampler.stop()
        await self.alerts.stop()
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close)
        await self.upstream.aclose()
        await self.probe_client.aclose()
        if self.storage is not None:
            self.storage.close()

