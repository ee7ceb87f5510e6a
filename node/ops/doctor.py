"""`infernode doctor`: check the box and the config, and say what to fix.

Each check gives one `Check` (ok, warn or fail) with a one-line detail and, when it
is not ok, the fix. Checks read the box directly (NVML, the store, the database, the
port), so they work whether or not the node is running; a node that is running is
recognised on its port rather than reported as a conflict.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from node.accounts.storage import open_storage
from node.accounts.storage.migrations import MIGRATIONS
from node.accounts.tokens import ADMIN_KEY_FIX, admin_key_problem
from node.admin.client import node_tls
from node.config import Config
from node.errors import ConfigError
from node.ops.fleet import read_master_key
from node.supply.lockfile import LockFile, read_lock
from node.supply.resolve import stale_models
from node.supply.store import Store
from node.workers.gpus import Inventory, discover
from node.workers.placement import place
from node.workers.router import Router
from node.workers.supervisor import Supervisor

# Free space below this share of the disk (after the missing blobs are pulled) is a warning.
LOW_DISK_SHARE = 0.05


class Level(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    level: Level
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "level": self.level.value}


def ok(name: str, detail: str) -> Check:
    return Check(name, Level.OK, detail)


def warn(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, Level.WARN, detail, fix)


def fail(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, Level.FAIL, detail, fix)


def run_checks(config: Config, *, nvml: Any = None, timeout_s: float = 5.0, rehash: bool = False) -> list[Check]:
    """Every check, in the order a person would fix things (rehash: re-read every blob, slow on big models)."""
    inventory = discover(nvml)
    checks = [check_gpus(config, inventory)]
    lock, lock_check = _lock(config)
    checks += list(check_runtimes(config, lock))
    checks.append(check_port(config, timeout_s))
    checks.append(check_data_dir(config))
    if lock_check is not None:
        checks.append(lock_check)
    else:
        checks += list(check_store(config, lock, rehash=rehash))
        checks.append(check_disk(config, lock))
        checks.append(check_placement(config, lock, inventory))
    checks.append(check_database(config))
    checks.append(check_ledger(config, timeout_s))
    checks.append(check_admin_key(config))
    checks.append(check_fleet(config, timeout_s))
    checks.append(check_alerts(config))
    return checks


def _lock(config: Config) -> tuple[LockFile, Check | None]:
    try:
        return read_lock(config.lock_path), None
    except ConfigError as exc:
        return LockFile(), fail("models.lock", exc.message, "run `infernode lock`")


def check_gpus(config: Config, inventory: Inventory) -> Check:
    """Driver and NVML: a GPU model needs them; a CPU-only box only warns."""
    wants_gpu = [m.name for m in config.models if m.launched and m.gpu_count > 0]
    if inventory.gpus:
        names = ", ".join(sorted({g.name for g in inventory.gpus}))
        return ok("driver", f"NVIDIA driver {inventory.driver}, NVML sees {len(inventory.gpus)} GPU(s): {names}")
    why = inventory.error or "no GPU found"
    if wants_gpu:
        return fail("driver", f"{why}; models {', '.join(wants_gpu)} need GPUs",
                    "install the NVIDIA driver (nvidia-smi must work) or set gpus = 0 for CPU models")
    return warn("driver", f"{why}; only CPU models are configured", "nothing, unless this box should have GPUs")


def check_runtimes(config: Config, lock: LockFile) -> Iterator[Check]:
    """Each configured runtime: installed where the config says, and its version."""
    used = sorted({m.runtime for m in config.models if m.launched})
    if not used:
        yield ok("runtimes", "no model needs a local runtime")
        return

    async def run() -> list[tuple[str, Any]]:
        async with httpx.AsyncClient() as client:
            sup = Supervisor(config, lock, Store(config.data_dir / "store"), Inventory(()), Router(()), client)
            return [(name, await sup.check_runtime(name, build=False)) for name in used]

    for name, check in asyncio.run(run()):
        if check.ok:
            yield ok(f"runtime {name}", f"installed, version {check.detail}")
        else:
            yield fail(f"runtime {name}", check.detail,
                       f"install {name} (docs/gpus-and-runtimes.md) or point [runtimes.{name}] at its python/binary")


def check_port(config: Config, timeout_s: float) -> Check:
    """The listen port: free, or held by this node (answering /healthz)."""
    host, port = config.node.host, config.node.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return ok("port", f"{config.node.listen} is free")
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return fail("port", f"cannot listen on {config.node.listen}: {exc.strerror}",
                            "change [node].listen to an address of this box")
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    try:
        r = httpx.get(f"{config.node.scheme}://{probe_host}:{port}/healthz", timeout=timeout_s, verify=_trust(config))
        if r.status_code == 200 and r.json().get("status") == "ok" and _our_node(config, probe_host, port, timeout_s):
            return ok("port", f"{config.node.listen} is in use by this node (running)")
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return fail("port", f"{config.node.listen} is in use by another program",
                f"stop it (ss -ltnp 'sport = :{port}' shows which) or change [node].listen")


def _our_node(config: Config, host: str, port: int, timeout_s: float) -> bool:
    """Does the node on the port accept this config's admin key (so it is ours, not a stranger)?"""
    key = config.admin_key()
    if not key:
        return True  # nothing to tell them apart with; /healthz answered as a node does
    r = httpx.get(f"{config.node.scheme}://{host}:{port}/admin/v1/status", headers={"authorization": f"Bearer {key}"},
                  timeout=timeout_s, verify=_trust(config))
    return r.status_code == 200


def _trust(config: Config) -> ssl.SSLContext | bool:
    """Over TLS, the node's own certificate is trusted (it may be self-signed)."""
    return node_tls(config) if config.node.tls_cert else True


def check_data_dir(config: Config) -> Check:
    d = config.data_dir
    existing = next((p for p in (d, *d.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        return fail("data_dir", f"{existing} is not writable by this user ({os.geteuid()})",
                    "chown the folder to the node's user or change [node].data_dir")
    return ok("data_dir", f"{d} is writable" if d.exists() else f"{d} will be created (under {existing})")


def check_store(config: Config, lock: LockFile, *, rehash: bool = False) -> Iterator[Check]:
    """The store against models.lock: every pinned file present at its size, and with rehash its digest."""
    stale = stale_models(config, lock)
    store = Store(config.data_dir / "store")
    for m in config.models:
        if not m.launched:
            continue
        if m.name in stale:
            yield fail(f"model {m.name}", stale[m.name])
            continue
        entry = lock.entry(m.name)
        assert entry is not None
        missing = store.missing(entry)
        if missing:
            size = sum(f.size for f in missing)
            yield warn(f"model {m.name}", f"{len(missing)} of {len(entry.files)} files ({_size(size)}) missing "
                       "or incomplete in the store", "run `infernode pull` (the node also pulls on start)")
            continue
        bad = [p for f in entry.files if rehash and (p := store.rehash(f)) is not None]
        if bad:
            yield fail(f"model {m.name}", f"{len(bad)} of {len(entry.files)} files are corrupt: {bad[0]}",
                       "run `infernode verify` (moves them aside), then `infernode pull`")
        else:
            yield ok(f"model {m.name}", f"{len(entry.files)} files, {_size(entry.total_size)}, all in the store"
                     + (", digests verified" if rehash else " (`--rehash` re-reads them)"))


def check_disk(config: Config, lock: LockFile) -> Check:
    """Free space where the store lives, against what is still to be pulled."""
    store = Store(config.data_dir / "store")
    d = next((p for p in (store.root, *store.root.parents) if p.exists()), Path("/"))
    usage = shutil.disk_usage(d)
    need = 0
    for m in config.models:
        entry = lock.entry(m.name)
        if entry is not None and m.launched and entry.source == m.source:
            need += sum(f.size for f in store.missing(entry))
    left = usage.free - need
    detail = f"{_size(usage.free)} free on {d}" + (f", {_size(need)} still to pull" if need else "")
    if left < 0:
        return fail("disk", detail, f"free {_size(-left)} or move [node].data_dir to a bigger disk")
    if left < usage.total * LOW_DISK_SHARE:
        return warn("disk", detail + f" (under {LOW_DISK_SHARE:.0%} left after that)", "free some space")
    return ok("disk", detail)


def check_placement(config: Config, lock: LockFile, inventory: Inventory) -> Check:
    placement = place(config, lock, inventory)
    if placement.unplaced:
        u = placement.unplaced[0]
        more = f" (and {len(placement.unplaced) - 1} more)" if len(placement.unplaced) > 1 else ""
        return fail("placement", f"{u.model.name} replica {u.replica} cannot be placed: {u.reason}{more}",
                    "lower gpus/replicas/gpu_memory for that model, or add GPUs")
    return ok("placement", f"{len(placement.placed)} replica(s) fit on this box")


def check_database(config: Config) -> Check:
    """The database answers and its schema is the one this node expects."""
    url = config.database_url()
    shown = url.split("@")[-1] if "@" in url else url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return ok("database", f"{shown} will be created on first start")  # and doctor must not create it
    try:
        storage = open_storage(url)
    except Exception as exc:
        return fail("database", f"cannot open {shown}: {exc}", "check [database].url")
    try:
        applied = storage.applied_migrations()
    except Exception as exc:
        return fail("database", f"cannot reach {shown}: {str(exc).splitlines()[0]}",
                    "start the database or fix [database].url")
    finally:
        storage.close()
    known = [name for name, _ in MIGRATIONS]
    unknown = [a for a in applied if a not in known]
    if unknown:
        return fail("database", f"{shown} has migrations this node does not know ({', '.join(unknown)})",
                    "upgrade infernode to the version that wrote them")
    pending = [k for k in known if k not in applied]
    if pending:
        return warn("database", f"{shown} reachable; {len(pending)} migration(s) pending ({pending[-1]})",
                    "nothing: `infernode up` applies them on start")
    return ok("database", f"{shown} reachable, schema at {known[-1]}")


def _running_status(config: Config, timeout_s: float) -> dict[str, Any] | None:
    """The running node's /admin/v1/status (None when no node of this config answers)."""
    key = config.admin_key()
    host = config.node.host
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    if not key:
        return None
    try:
        r = httpx.get(f"http://{probe_host}:{config.node.port}/admin/v1/status",
                      headers={"authorization": f"Bearer {key}"}, timeout=timeout_s)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def check_ledger(config: Config, timeout_s: float) -> Check:
    """The usage ledger: rows queued, spilled while the database was away, dropped (the running node's
    counts when it answers, else the spill file it left)."""
    spill = config.data_dir / "ledger.spill"
    status = _running_status(config, timeout_s)
    led = status.get("ledger") if isinstance(status, dict) else None
    if isinstance(led, dict):
        detail = (f"{led['written']} rows written, {led['queued']} queued, {led['spilled']} spilled "
                  f"({led['spill_bytes']} bytes awaiting replay), {led['dropped']} dropped, "
                  f"{led.get('quarantined', 0)} quarantined since start")
        if not led["database_up"]:
            return fail("ledger", f"the running node cannot write usage to the database; {detail}",
                        "bring the database back: spilled rows are replayed when it answers")
        if led["dropped"]:
            return warn("ledger", detail, "usage rows were lost (queue or spill file full); check the database's "
                                          "availability and the node's log")
        if led.get("quarantined"):
            return warn("ledger", detail, f"the database refused rows (kept in {config.data_dir / 'ledger.quarantine.jsonl'}, "
                                          "their made-safe copies written); see the node's log for why")
        if led["spill_bytes"]:
            return warn("ledger", detail, "the spill file is replayed as soon as the database takes writes")
        return ok("ledger", detail)
    try:
        size = spill.stat().st_size
    except FileNotFoundError:
        return ok("ledger", "no usage rows waiting in a spill file")
    except OSError as exc:
        return warn("ledger", f"cannot read {spill}: {exc.strerror}", "check the data_dir's permissions")
    with spill.open("rb") as f:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return warn("ledger", f"{rows} usage rows ({_size(size)}) spilled to {spill} while the database was away",
                "they are written to the database at the node's next start, once the database answers")


def check_admin_key(config: Config) -> Check:
    where = (f"${config.node.admin_key_env}" if os.environ.get(config.node.admin_key_env)
             else str(config.admin_key_path))
    key = config.admin_key()
    problem = admin_key_problem(key) if key else None
    if problem:
        return fail("admin key", f"the key in {where} {problem}; `infernode up` refuses it", ADMIN_KEY_FIX)
    if os.environ.get(config.node.admin_key_env):
        return ok("admin key", f"set in ${config.node.admin_key_env}")
    if key:
        return ok("admin key", f"set in {config.admin_key_path}")
    return warn("admin key", "not set; the node generates one into data_dir/admin.key on first start",
                f"set ${config.node.admin_key_env} or [node].admin_key_file to choose it yourself")


def check_fleet(config: Config, timeout_s: float) -> Check:
    """The LiteLLM proxy answers, and accepts the master key."""
    fleet = config.fleet.litellm
    if fleet is None:
        return ok("fleet", "not configured ([fleet.litellm] unset)")
    base = fleet.url.rstrip("/")
    try:
        r = httpx.get(base + "/health/liveliness", timeout=timeout_s)
    except httpx.HTTPError as exc:
        return fail("fleet", f"LiteLLM at {base} is unreachable: {type(exc).__name__}",
                    "start the proxy or fix [fleet.litellm].url")
    if r.status_code != 200:
        return fail("fleet", f"LiteLLM at {base} answered {r.status_code} on /health/liveliness",
                    "check that [fleet.litellm].url is the proxy's base URL")
    key = read_master_key(config)
    if not key:
        return fail("fleet", f"LiteLLM at {base} is up but no master key is set",
                    f"set ${fleet.master_key_env} or [fleet.litellm].master_key_file")
    try:
        r = httpx.get(base + "/model/info", headers={"authorization": f"Bearer {key}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return fail("fleet", f"LiteLLM at {base}: /model/info failed ({type(exc).__name__})", "check the proxy's logs")
    if r.status_code in (401, 403) or _auth_error(r):
        return fail("fleet", f"LiteLLM at {base} rejects the master key ({r.status_code})",
                    f"set ${fleet.master_key_env} to the proxy's master key")
    if r.status_code >= 400:
        return warn("fleet", f"LiteLLM at {base} is up; /model/info answered {r.status_code}", "check the proxy's logs")
    return ok("fleet", f"LiteLLM at {base} is up and accepts the master key")


def _auth_error(r: httpx.Response) -> bool:
    """Did LiteLLM refuse the key? A bad key is error.type "auth_error"; a proxy without a
    database answers "no_db_connection" instead, because only a non-master key is looked up there."""
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(err, dict) and err.get("type") in ("auth_error", "no_db_connection")


def check_alerts(config: Config) -> Check:
    a = config.alerts
    if not a.webhook_urls:
        return ok("alerts", "no webhooks configured")
    if not config.secret(a.secret_env, a.secret_file):
        return warn("alerts", f"{len(a.webhook_urls)} webhook(s) but no signing secret; alerts go unsigned",
                    f"set ${a.secret_env} or [alerts].secret_file")
    return ok("alerts", f"{len(a.webhook_urls)} webhook(s), signed")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
