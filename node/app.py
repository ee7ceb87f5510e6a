"""The running node: every service wired together, started and stopped in order.

Constructing a `Node` does no I/O; `start` opens the database, loads keys, checks
and pulls the store, places and launches workers; `shutdown` drains and stops them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any

import httpx

import runtimes
from node.accounts.audit import AuditRecord, scrub
from node.accounts.keys import KeyRecord, KeyRing, hash_secret, new_key_id, new_secret
from node.accounts.ledger import Ledger, rebuild_counters
from node.accounts.plans import PlanRecord, effective
from node.accounts.quotas import Quotas
from node.accounts.roles import Principal
from node.accounts.storage import Storage, StorageUnavailable, open_storage
from node.accounts.tokens import TokenRecord, TokenRing, new_token_id, new_token_secret
from node.config import Config, load_config
from node.console.sessions import SignedIn
from node.errors import AuthenticationError, NoReadyReplica, OperationFailed
from node.gateway.proxy import Gateway, ModelInfo
from node.gateway.upstream import Pool
from node.ops.alerts import Alerter, budget_uses
from node.ops.fleet import FleetReconciler, LiteLLMAdmin, ensure_fleet_key, read_master_key
from node.ops.logs import ACCESS_LOGGER
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


def ensure_admin_key(config: Config) -> tuple[str, bool]:
    """The admin key, generating one into data_dir/admin.key (0600) when none is set."""
    key = config.admin_key()
    if key:
        return key, False
    path = config.admin_key_path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-admin-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True


class Node:
    def __init__(self, config: Config, *, nvml: Any = None) -> None:
        self.config = config
        self.nvml = nvml
        self.metrics = Metrics()
        self.keys = KeyRing()
        self.tokens = TokenRing()
        self._stored_plans: dict[str, PlanRecord] = {}
        self.quotas = Quotas()
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
        self.admin_key = ""
        self.started_at = time.time()
        self.startup_error: str | None = None
        self.starting = True
        self._tasks: list[asyncio.Task] = []
        self._keys_version: int | None = None
        # A refresh reads the database then swaps the ring; a key written in between must not be lost.
        self._keys_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self.fleet: FleetReconciler | None = None
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
        return {m.name: ModelInfo(name=m.name, max_model_len=m.max_model_len, price_input=m.price_input,
                                  price_output=m.price_output, max_inflight=m.max_inflight, max_queue=m.max_queue,
                                  read_timeout_s=m.read_timeout_s, connect_timeout_s=m.connect_timeout_s,
                                  on_demand=m.on_demand, fallbacks=tuple(m.fallbacks))
                for m in self.config.models}

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
            stream_usage=lambda target: bool(target.plan and target.plan.stream_usage),
            upstream_model=lambda target: target.plan.upstream_model if target.plan else None,
            uuid_request_ids=lambda target: bool(target.plan and target.plan.uuid_request_ids),
            upstream_headers=lambda target: target.plan.headers if target.plan else (),
            dialect_of=lambda target: target.plan.dialect if target.plan and not target.plan.dialect.native else None,
            serves_api=lambda target, api: bool(target.plan and api in target.plan.native_apis),
            cannot=lambda target, endpoint: target.plan.cannot.get(endpoint) if target.plan else None,
            format_of=self._model_format, card_of=lambda name: self.cards.get(name),
            log_prompts=self.config.node.log_prompts, ensure_loaded=self.ensure_loaded,
        )

    async def ensure_loaded(self, model: str) -> None:
        """The gateway's seam to on-demand loading: return once `model` is ready, else NoReadyReplica."""
        if self.loader is None:
            raise NoReadyReplica("the node is starting", retry_after=2)
        await self.loader.ensure_loaded(model)

    def _busy(self, model: str) -> bool:
        """Whether the gateway has requests for `model` in flight or queued (then it is not evicted)."""
        gate = self.gateway.gates.get(model) if self.gateway is not None else None
        return gate is not None and (gate.inflight > 0 or gate.queued > 0)

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
        self.tokens.set_bootstrap(self.admin_key)
        if generated:
            log.warning("no admin key was set; generated one in %s", self.config.admin_key_path)
        self.quotas.set_prices(self.prices())
        self.storage = open_storage(self.config.database_url())
        await asyncio.to_thread(self.storage.migrate)
        await self.refresh_keys(force=True)
        # Before the gateway exists: a restart must reset neither a rate window nor a budget.
        rows = await asyncio.to_thread(rebuild_counters, self.storage, self.quotas, time.time())
        log.info("quota counters rebuilt from the ledger (%d rows in the last minute)", rows)
        self.ledger = Ledger(self.storage, spill_path=self.config.data_dir / "ledger.spill")
        self.ledger.start()
        self.metrics.ledger_stats = self.ledger.stats
        self._tasks.append(asyncio.create_task(self._keys_loop(), name="keys-refresh"))
        self.gateway = self.build_gateway(self.ledger)
        self.sampler.start()
        self.alerts.start()
        if self.alerts.enabled:
            storage = self.storage
            self._tasks.append(asyncio.create_task(self.alerts.watch_budgets(
                lambda: budget_uses(storage, self.keys.all(), budgets=self._budgets_of),
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
        if self.config.fleet.litellm is not None:
            await self.start_fleet(register=self.config.fleet.litellm.register_on_start)

    async def start_fleet(self, *, register: bool) -> None:
        """Make (or reuse) the fleet key; with register, keep the proxy's deployments true."""
        if self.fleet is None:
            assert self.config.fleet.litellm is not None
            admin = LiteLLMAdmin(self.config.fleet.litellm.url, read_master_key(self.config))
            self.fleet = FleetReconciler(self.config, admin, ready_models=self.ready_models, api_key=self.fleet_key)
        try:
            await self.fleet_key()
        except StorageUnavailable as exc:
            log.warning("fleet: cannot create the fleet key yet: %s", exc)
        if register:
            self.fleet.start()

    async def fleet_key(self) -> str:
        """The secret of the node key the fleet proxy uses (created once, then reused)."""
        key_id, secret = await ensure_fleet_key(self.config, self.keys.get, self.create_key)
        if self.fleet is not None:
            self.fleet.status.key_id = key_id
        return secret

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
        if self.fleet is not None:
            self.fleet.poke()
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
            if self.fleet is not None and config.fleet.litellm is not None:
                # Per-model rpm/tpm/order/tags may have changed; the proxy URL and key stay until restart.
                self.fleet.config = config.model_copy(update={"fleet": self.fleet.config.fleet})
                self.fleet.poke()
            self.quotas.set_prices(self.prices())
            self.quotas.set_teams(self.quotas.teams(), self.plans(), config.model_groups)
            if self.gateway is not None:
                self.gateway.set_models(self.model_infos())
            if config.node.pull_on_start:
                await self._pull_missing()
            self.cards = await asyncio.to_thread(self._read_cards, lock)
            summary = await self.supervisor.reload(config, lock)
            log.info("reloaded %s: %s", config.path, summary)
            return {**summary, "notes": notes}

    # -- keys ------------------------------------------------------------------
    async def refresh_keys(self, force: bool = False) -> None:
        """Reload keys and teams when the database says they changed (other nodes' changes too)."""
        assert self.storage is not None
        async with self._keys_lock:
            version = await asyncio.to_thread(self.storage.keys_version)
            if force or version != self._keys_version:
                records = await asyncio.to_thread(self.storage.list_keys)
                teams = await asyncio.to_thread(self.storage.list_teams)
                tokens = await asyncio.to_thread(self.storage.list_tokens)
                plans = await asyncio.to_thread(self.storage.list_plans)
                self.keys.replace_all(records)
                self._stored_plans = {p.name: p for p in plans}
                self.quotas.set_teams(teams, self.plans(), self.config.model_groups)
                self.tokens.replace_all(tokens)
                self._keys_version = version

    async def _keys_loop(self) -> None:
        """Poll the settings version every 0.5 s, so a change on any node applies within a second."""
        ticks = 0
        while True:
            await asyncio.sleep(0.5)
            ticks += 1
            if ticks % 60 == 0:
                self.quotas.sweep()
            try:
                await self.refresh_keys()
            except StorageUnavailable as exc:
                if ticks % 20 == 1:
                    log.warning("key refresh failed (keys stay as they were): %s", exc)

    def identify(self, secret: str) -> SignedIn | None:
        """Who a console sign-in is: an admin token (the bootstrap key included) or an API key in good standing."""
        who = self.tokens.principal(secret)
        if who is not None:
            record = self.tokens.get(who.id)
            name = record.name if record is not None else "admin key"
            return SignedIn("admin", who.role.label, who.id, name, who.team, secret)
        try:
            key = self.keys.lookup(secret)
        except AuthenticationError:
            return None   # revoked or expired
        if key is None:
            return None
        return SignedIn("key", "key", key.id, key.name, key.team, secret)

    async def create_key(self, **fields: Any) -> tuple[KeyRecord, str]:
        """A new key and its secret (returned once, stored as a hash)."""
        assert self.storage is not None
        if fields.get("plan") is None:  # [quotas.default] is for keys without a plan
            q = self.config.default_quota
            defaults = {"rpm": q.rpm, "tpm": q.tpm, "max_parallel": q.max_parallel, "budget_tokens": q.budget_tokens,
                        "budget_period": q.budget_period, "user_rpm": q.user_rpm, "user_tpm": q.user_tpm}
            for k, v in defaults.items():
                if fields.get(k) is None:
                    fields[k] = v
        secret = new_secret()
        record = KeyRecord(id=new_key_id(), secret_hash=hash_secret(secret), prefix=secret[:8], **fields)
        async with self._keys_lock:
            await asyncio.to_thread(self.storage.insert_key, record)
            self.keys.put(record)
        return record, secret

    async def save_key(self, record: KeyRecord) -> None:
        assert self.storage is not None
        async with self._keys_lock:
            await asyncio.to_thread(self.storage.save_key, record)
            self.keys.put(record)

    def _budgets_of(self, scope: str, record: Any) -> tuple[int | None, float | None, str]:
        """A key's or team's budgets with its plan folded in (for budget alerts)."""
        e = effective(record, self.plans().get(record.plan) if record.plan else None, {})
        return e.budget_tokens, e.budget_usd, e.budget_period

    def plans(self) -> dict[str, PlanRecord]:
        """Every plan: appliance.toml's [plans.*], overridden by the stored ones of the same name."""
        plans = {name: PlanRecord(name=name, models=tuple(p.models) if p.models is not None else None, rpm=p.rpm,
                                  tpm=p.tpm, max_parallel=p.max_parallel, budget_tokens=p.budget_tokens,
                                  budget_usd=p.budget_usd, budget_period=p.budget_period, created_at=0, updated_at=0)
                 for name, p in self.config.plans.items()}
        return {**plans, **self._stored_plans}

    async def create_token(self, name: str, role: str, team: str | None, created_by: str) -> tuple[TokenRecord, str]:
        """A new admin token and its secret (returned once, stored as a hash)."""
        assert self.storage is not None
        secret = new_token_secret()
        record = TokenRecord(id=new_token_id(), name=name, role=role, team=team, secret_hash=hash_secret(secret),
                             prefix=secret[:11], created_by=created_by)
        async with self._keys_lock:  # a refresh reading meanwhile would drop it from the ring
            await asyncio.to_thread(self.storage.insert_token, record)
            self.tokens.put(record)
        return record, secret

    async def save_token(self, record: TokenRecord) -> None:
        assert self.storage is not None
        async with self._keys_lock:
            await asyncio.to_thread(self.storage.save_token, record)
            self.tokens.put(record)

    async def audit(self, who: Principal, source: str, action: str, target: str, changes: dict[str, Any],
                    request_id: str) -> AuditRecord:
        """Append one record to the hash-chained audit log (secrets scrubbed from `changes`)."""
        assert self.storage is not None
        record = AuditRecord(seq=0, ts=time.time(), actor_id=who.id, actor_role=who.role.label, source=source,
                             action=action, target=target, changes=scrub(changes), request_id=request_id)
        return await asyncio.to_thread(self.storage.append_audit, record)

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
        if self.fleet is not None:
            # Leave the fleet before the workers go; a detach (upgrade) keeps the ids for the successor.
            await self.fleet.stop(deregister=not detach)
            await self.fleet.admin.aclose()
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
