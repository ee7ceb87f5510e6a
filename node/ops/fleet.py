"""Fleet membership: this node's models as deployments of a LiteLLM proxy.

LiteLLM's model-management API (`POST /model/new`, `POST /model/update`,
`POST /model/delete`, `GET /model/info`, all with the master key; the proxy needs a
database and `STORE_MODEL_IN_DB=True`) is driven by `FleetReconciler`: it diffs the
deployments this node wants (one per ready model) against the ones the proxy holds
under this node's id prefix, and adds, updates or deletes until they match. Ids are
stable (node name + model + replica set), so a restarted node updates its old
deployments instead of duplicating them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from node.accounts.keys import hash_secret
from node.config import Config, LiteLLMFleet, ModelConfig

log = logging.getLogger("infernode.fleet")

FLEET_KEY_FILE = "fleet.key"


def id_prefix(node_name: str) -> str:
    """Every deployment id this node owns starts with this."""
    return "infernode-" + re.sub(r"[^A-Za-z0-9._-]", "_", node_name) + "--"


def deployment_id(node_name: str, model: str, advertise_url: str) -> str:
    """A stable id: node name + model + replica set (the node's advertised address serving them)."""
    replica_set = hashlib.sha256(f"{advertise_url.rstrip('/')}|{model}".encode()).hexdigest()[:10]
    return f"{id_prefix(node_name)}{re.sub(r'[^A-Za-z0-9._-]', '_', model)}--{replica_set}"


@dataclass(frozen=True)
class Deployment:
    """One LiteLLM deployment: what `/model/new` takes and `model_list` holds."""

    id: str
    model_name: str
    litellm_params: dict[str, Any]
    model_info: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "litellm_params": dict(self.litellm_params),
                "model_info": {**self.model_info, "id": self.id}}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.body(), sort_keys=True).encode()).hexdigest()


def deployment_for(config: Config, fleet: LiteLLMFleet, model: ModelConfig, api_key: str) -> Deployment:
    """The deployment that sends `model` to this node's `/v1` with the fleet key."""
    params: dict[str, Any] = {"model": f"openai/{model.name}", "api_base": fleet.advertise_url.rstrip("/") + "/v1",
                              "api_key": api_key}
    for k in ("rpm", "tpm", "order"):
        v = getattr(model, k)
        if v is not None:
            params[k] = v
    if model.tags:
        params["tags"] = list(model.tags)
    info: dict[str, Any] = {"infernode_node": config.node.name, "mode": "chat"}
    if model.max_model_len:
        info["max_input_tokens"] = model.max_model_len
    return Deployment(id=deployment_id(config.node.name, model.name, fleet.advertise_url), model_name=model.name,
                      litellm_params=params, model_info=info)


def desired_deployments(config: Config, api_key: str, models: Iterable[str]) -> list[Deployment]:
    """Deployments for the named models (in config order)."""
    fleet = config.fleet.litellm
    assert fleet is not None
    wanted = set(models)
    return [deployment_for(config, fleet, m, api_key) for m in config.models if m.name in wanted]


def _q(s: Any) -> str:
    # JSON strings and numbers are valid YAML scalars, and quoting keeps secrets and
    # odd names from being read as other YAML types.
    return json.dumps(s)


def model_list_yaml(deployments: Iterable[Deployment]) -> str:
    """The `model_list:` block of a LiteLLM config.yaml, ready to paste."""
    lines = ["model_list:"]
    for d in deployments:
        b = d.body()
        lines.append(f"  - model_name: {_q(b['model_name'])}")
        lines.append("    litellm_params:")
        for k, v in b["litellm_params"].items():
            lines.append(f"      {k}: {_q(v)}")
        lines.append("    model_info:")
        for k, v in b["model_info"].items():
            lines.append(f"      {k}: {_q(v)}")
    return "\n".join(lines) + "\n"


def read_master_key(config: Config) -> str | None:
    """LiteLLM's master key: from the named environment variable, else master_key_file."""
    fleet = config.fleet.litellm
    return config.secret(fleet.master_key_env, fleet.master_key_file) if fleet else None


class ProxyError(Exception):
    """The proxy refused or could not be reached; `status` is its HTTP status when it answered."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LiteLLMAdmin:
    """A client of LiteLLM's model-management endpoints."""

    def __init__(self, url: str, master_key: str | None, *, timeout: float = 10.0) -> None:
        headers = {"authorization": f"Bearer {master_key}"} if master_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ProxyError(f"LiteLLM proxy at {self.url} unreachable: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 400:
            text = r.text[:300]
            if r.status_code in (401, 403):
                raise ProxyError(f"LiteLLM refused the master key ({r.status_code}): {text}; check [fleet.litellm] "
                                 "master_key_env / master_key_file", status=r.status_code)
            if r.status_code == 500 and "db" in text.lower():
                raise ProxyError(f"LiteLLM cannot store models ({text}); run it with a database and "
                                 "STORE_MODEL_IN_DB=True, or paste `infernode fleet config` into its config.yaml", status=500)
            raise ProxyError(f"LiteLLM {method} {path} answered {r.status_code}: {text}", status=r.status_code)
        try:
            return r.json()
        except ValueError:
            return None

    async def deployments(self, prefix: str) -> dict[str, dict[str, Any]]:
        """The proxy's deployments whose id starts with prefix, by id."""
        data = await self._call("GET", "/model/info")
        out: dict[str, dict[str, Any]] = {}
        for d in (data or {}).get("data", []):
            mid = (d.get("model_info") or {}).get("id")
            if isinstance(mid, str) and mid.startswith(prefix):
                out[mid] = d
        return out

    async def add(self, dep: Deployment) -> None:
        await self._call("POST", "/model/new", json=dep.body())

    async def update(self, dep: Deployment) -> None:
        await self._call("POST", "/model/update", json=dep.body())

    async def delete(self, deployment_id: str) -> None:
        try:
            await self._call("POST", "/model/delete", json={"id": deployment_id})
        except ProxyError as exc:
            # Already gone (LiteLLM answers 400 "not found in db"): deleting is idempotent.
            if exc.status not in (400, 404) or "not found" not in str(exc).lower():
                raise


@dataclass
class FleetStatus:
    """What the reconciler last did, for `infernode fleet status`."""

    enabled: bool = False
    proxy: str = ""
    registering: bool = False
    registered: list[str] = field(default_factory=list)
    last_sync: float | None = None
    last_error: str | None = None
    failures: int = 0
    next_retry_s: float | None = None
    key_id: str | None = None


class FleetReconciler:
    """Keeps the proxy's deployments for this node equal to its ready models."""

    def __init__(self, config: Config, admin: LiteLLMAdmin, *, ready_models: Callable[[], Iterable[str]],
                 api_key: Callable[[], Awaitable[str]], resync_s: float = 60.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.config, self.admin = config, admin
        self.ready_models, self.api_key = ready_models, api_key
        self.resync_s, self.backoff_initial_s, self.backoff_max_s = resync_s, backoff_initial_s, backoff_max_s
        self.prefix = id_prefix(config.node.name)
        self.status = FleetStatus(enabled=True, proxy=admin.url)
        self._pushed: dict[str, str] = {}   # id -> fingerprint this process registered
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Start the background loop (idempotent)."""
        if self._task is None or self._task.done():
            self.status.registering = True
            self._task = asyncio.create_task(self._loop(), name="fleet-reconciler")
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def poke(self) -> None:
        """A model became ready or went away: sync soon."""
        self._wake.set()

    async def sync(self) -> list[str]:
        """One pass: add, update and delete until the proxy matches; the ids now registered."""
        async with self._lock:
            key = await self.api_key()
            want = {d.id: d for d in desired_deployments(self.config, key, self.ready_models())}
            have = await self.admin.deployments(self.prefix)
            for dep_id, dep in want.items():
                fp = dep.fingerprint()
                if dep_id not in have:
                    try:
                        await self.admin.add(dep)
                    except ProxyError as exc:
                        # Stored but not yet in the proxy's router (another pod, or a reload under way):
                        # the id is ours, so replace it rather than fail.
                        if exc.status != 400 or "unique" not in str(exc).lower():
                            raise
                        await self.admin.update(dep)
                    log.info("fleet: registered %s with %s", dep_id, self.admin.url)
                elif self._pushed.get(dep_id) != fp:
                    # The proxy masks api_key in /model/info, so compare with what we sent, not what it shows.
                    await self.admin.update(dep)
                    log.info("fleet: updated %s", dep_id)
                self._pushed[dep_id] = fp
            for dep_id in have.keys() - want.keys():
                await self.admin.delete(dep_id)
                self._pushed.pop(dep_id, None)
                log.info("fleet: removed %s", dep_id)
            self.status.registered = sorted(want)
            self.status.last_sync = time.time()
            self.status.last_error = None
            self.status.failures = 0
            self.status.next_retry_s = None
            return self.status.registered

    async def _loop(self) -> None:
        delay = self.backoff_initial_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.resync_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(0.2)  # several replicas often change at once: sync once for all
            try:
                await self.sync()
                delay = self.backoff_initial_s
            except Exception as exc:  # the proxy, or the key store, failed: keep trying with backoff
                self.status.failures += 1
                self.status.last_error = str(exc)
                self.status.next_retry_s = delay
                log.warning("fleet: sync with %s failed (retry in %.1fs): %s", self.admin.url, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                self._wake.set()

    async def stop(self, *, deregister: bool, timeout: float = 5.0) -> int:
        """Stop the loop; with deregister, remove this node's deployments (bounded by timeout)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        was_registering, self.status.registering = self.status.registering, False
        if not (deregister and was_registering):
            return 0
        try:
            return await asyncio.wait_for(self._deregister(), timeout)
        except (TimeoutError, ProxyError) as exc:
            self.status.last_error = f"deregistration failed: {exc or 'timed out'}"
            log.warning("fleet: %s", self.status.last_error)
            return 0

    async def _deregister(self) -> int:
        async with self._lock:
            have = await self.admin.deployments(self.prefix)
            for dep_id in have:
                await self.admin.delete(dep_id)
                log.info("fleet: removed %s", dep_id)
            self._pushed.clear()
            self.status.registered = []
            return len(have)


def proxy_label(url: str) -> str:
    """A short name for the proxy, for the fleet key's name."""
    parts = urlsplit(url)
    return parts.netloc or url


def fleet_key_path(config: Config) -> Path:
    return config.data_dir / FLEET_KEY_FILE


def load_fleet_key(path: Path) -> tuple[str, str] | None:
    """(key id, secret) saved by an earlier run, or None."""
    try:
        data = json.loads(path.read_text())
        return str(data["id"]), str(data["secret"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_fleet_key(path: Path, key_id: str, secret: str, proxy: str) -> None:
    """Write the fleet key 0600 (the secret is shown only once, so the node keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"id": key_id, "secret": secret, "proxy": proxy}, f)
    os.replace(tmp, path)


async def ensure_fleet_key(config: Config, lookup: Callable[[str], Any],
                           create_key: Callable[..., Awaitable[tuple[Any, str]]]) -> tuple[str, str]:
    """(key id, secret) of the node key the proxy uses: the saved one while it exists unrevoked, else a new one."""
    fleet = config.fleet.litellm
    assert fleet is not None
    path = fleet_key_path(config)
    saved = load_fleet_key(path)
    if saved is not None:
        record = lookup(saved[0])
        if (record is not None and not record.revoked and not record.expired(time.time())
                and record.secret_hash == hash_secret(saved[1])):
            return saved
        log.warning("fleet: the saved fleet key %s is gone or revoked; creating a new one", saved[0])
    label = proxy_label(fleet.url)
    record, secret = await create_key(name=f"fleet:{label}", rpm=fleet.key_rpm, tpm=fleet.key_tpm,
                                      metadata={"fleet": "litellm", "proxy": fleet.url})
    save_fleet_key(path, record.id, secret, fleet.url)
    log.info("fleet: created fleet key %s for %s (saved in %s)", record.id, label, path)
    return record.id, secret
