"""Placement: a pure function of (config, lock, GPU inventory) -> desired replicas.

Each replica needs `gpus` devices (a count, or explicit indices/UUIDs) with `need`
bytes on each. `need` is `gpu_memory` when set, else estimated from the pinned weights:

    need = weights / n_gpus * (1 + KV_RESERVE_FRACTION) + CUDA_OVERHEAD

i.e. the weights' share of each GPU, a quarter on top for KV cache and activations,
and 1 GiB for the CUDA context, rounded up to 256 MiB.

A device's capacity is its total memory times MAX_UTILIZATION, not NVML's live free
figure: our own workers' memory must not count against them, or a reload or a node
restart that adopts running workers would place them differently. A GPU in MIG mode
is not placed on whole; its MIG instances are (one per replica, as CUDA allows).
Replicas with explicit `gpus` are placed first, then the rest in config order, so that
adding a model never moves the ones already running. `binpack` (default) picks the
fullest device that still fits, `spread` the one with the fewest replicas (then the
most room). A replica alone on its devices gets the runtime's default memory use;
replicas sharing a device each get `gpu_memory_fraction` = the memory charged for it /
the device's total.

On-demand models are not placed at start: `place_on_demand` places one when it loads,
around what is resident then (always models, loaded on-demand ones) and around memory
NVML says processes the node does not manage hold (`foreign_use`). Where on-demand
models may come, every replica on a GPU gets its share as a fraction, so that no
runtime takes the whole device by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from node.config import Config, GiB, ModelConfig
from node.supply.lockfile import LockFile
from node.workers.gpus import Inventory

KV_RESERVE_FRACTION = 0.25
CUDA_OVERHEAD = 1 * GiB
MAX_UTILIZATION = 0.95
_ROUND = 256 * 1024 ** 2


@dataclass(frozen=True)
class Placed:
    model: ModelConfig
    replica: int
    gpu_uuids: tuple[str, ...] = ()
    gpu_memory_fraction: float | None = None
    need_bytes: int = 0               # memory charged per GPU (0 on CPU)


@dataclass(frozen=True)
class Unplaced:
    model: ModelConfig
    replica: int
    reason: str


@dataclass(frozen=True)
class Placement:
    placed: tuple[Placed, ...]
    unplaced: tuple[Unplaced, ...]


@dataclass
class _Device:
    """A unit replicas are placed on: a whole GPU, or one MIG instance."""

    uuid: str
    label: str            # "GPU 1" or "GPU 0 MIG 2"
    index: int
    total: int
    mig: bool
    charged: int = 0
    tenants: list[int] = field(default_factory=list)   # indices into the placed list

    @property
    def room(self) -> int:
        return int(self.total * MAX_UTILIZATION) - self.charged


def gib(n: int) -> str:
    """Bytes as a short GiB figure ("23 GiB", "19.5 GiB")."""
    return f"{n / GiB:.1f}".removesuffix(".0") + " GiB"


def estimate_need(weights: int, n_gpus: int) -> int:
    """Memory per GPU for weights split over n GPUs plus the KV reserve (see module doc)."""
    raw = weights / max(n_gpus, 1) * (1 + KV_RESERVE_FRACTION) + CUDA_OVERHEAD
    return math.ceil(raw / _ROUND) * _ROUND


def need_per_gpu(m: ModelConfig, lock: LockFile) -> int:
    """What one replica of m needs on each of its GPUs."""
    if m.gpu_memory_bytes is not None:
        return m.gpu_memory_bytes
    entry = lock.entry(m.name)
    return estimate_need(entry.total_size if entry else 0, m.gpu_count)


def _devices(inventory: Inventory) -> list[_Device]:
    out: list[_Device] = []
    for g in inventory.gpus:
        if g.mig_mode:
            out += [_Device(d.uuid, f"GPU {g.index} MIG {d.index}", g.index, d.memory_total, True) for d in g.mig_devices]
        else:
            out.append(_Device(g.uuid, f"GPU {g.index}", g.index, g.memory_total, False))
    return out


def _select(selector: int | str, devices: list[_Device]) -> _Device | str:
    """The device an explicit `gpus` entry names, or why none."""
    for d in devices:
        if isinstance(selector, int) or (isinstance(selector, str) and selector.isdigit()):
            if not d.mig and d.index == int(selector):
                return d
        elif d.uuid == selector:
            return d
    if isinstance(selector, int) or selector.isdigit():
        mig = any(d.mig and d.index == int(selector) for d in devices)
        if mig:
            return f"GPU {selector} is in MIG mode; name one of its MIG instances by UUID"
        return f"no GPU with index {selector} (this box has {_index_range(devices)})"
    return f"no GPU or MIG instance with UUID {selector}"


def _index_range(devices: list[_Device]) -> str:
    idx = sorted({d.index for d in devices})
    return f"GPUs {idx[0]}-{idx[-1]}" if idx else "no GPU"


def _charges(need: int, chosen: list[_Device]) -> list[int]:
    """Bytes charged on each chosen device: a fraction of the smallest applies to all ranks."""
    smallest = min(d.total for d in chosen)
    return [math.ceil(need * d.total / smallest) for d in chosen]


def _fits(need: int, chosen: list[_Device]) -> bool:
    return all(d.room >= c for d, c in zip(chosen, _charges(need, chosen)))


def _choose(need: int, n: int, devices: list[_Device], mode: str) -> list[_Device] | None:
    pool = [d for d in devices if not (n > 1 and d.mig)]
    fitting = [d for d in pool if d.room >= need]
    key = (lambda d: (d.room, d.index, d.uuid)) if mode == "binpack" else (lambda d: (len(d.tenants), -d.room, d.index, d.uuid))
    fitting.sort(key=key)
    if n > 1:  # tensor parallel: prefer GPUs of one size so one memory fraction suits every rank
        by_size: dict[int, list[_Device]] = {}
        for d in fitting:
            by_size.setdefault(d.total, []).append(d)
        for group in by_size.values():
            if len(group) >= n and _fits(need, group[:n]):
                return group[:n]
    chosen = fitting[:n]
    return chosen if len(chosen) == n and _fits(need, chosen) else None


def _why_not(need: int, n: int, devices: list[_Device]) -> str:
    whole = [d for d in devices if not d.mig]
    if n > 1 and len(whole) < n:
        mig_note = " (MIG instances cannot be combined)" if len(whole) < len(devices) else ""
        return f"needs {n} GPUs; this box has {len(whole)} whole GPU(s){mig_note}"
    best = max(devices, key=lambda d: d.room)
    if n == 1:
        return f"needs {gib(need)}; the largest free GPU has {gib(max(best.room, 0))} ({best.label})"
    enough = sum(1 for d in whole if d.room >= need)
    return (f"needs {gib(need)} on each of {n} GPUs; {enough} GPU(s) have that much free "
            f"(largest free: {gib(max(best.room, 0))})")


def place(config: Config, lock: LockFile, inventory: Inventory) -> Placement:
    """Where each replica runs; replicas that cannot run are listed with the reason."""
    devices = _devices(inventory)
    placed: list[Placed] = []
    unplaced: list[Unplaced] = []
    gpu_models = [m for m in config.models if m.launched and m.gpu_count > 0 and not m.on_demand]
    share_all = any(m.on_demand and m.gpu_count > 0 for m in config.models)
    order = [m for m in gpu_models if not isinstance(m.gpus, int)] + [m for m in gpu_models if isinstance(m.gpus, int)]
    for m in config.models:  # on CPU, or on GPUs chosen when loaded (on demand)
        if m not in gpu_models:
            placed += [Placed(m, r) for r in range(m.replicas)]
    for m in order:
        placed_m, unplaced_m = _place_model(m, lock, inventory, devices, len(placed))
        placed += placed_m
        unplaced += unplaced_m
    return Placement(tuple(_with_fractions(placed, devices, share_all)), tuple(unplaced))


def _place_model(m: ModelConfig, lock: LockFile, inventory: Inventory, devices: list[_Device],
                 first: int) -> tuple[list[Placed], list[Unplaced]]:
    """Place every replica of m on devices (charging them); `first` is its first index in the placed list."""
    placed: list[Placed] = []
    unplaced: list[Unplaced] = []
    try:
        need = need_per_gpu(m, lock)
    except ValueError as exc:
        return [], [Unplaced(m, r, f"gpu_memory: {exc}") for r in range(m.replicas)]
    n = m.gpu_count
    for r in range(m.replicas):
        if not devices:
            why = ("every GPU is in MIG mode without MIG instances" if inventory.gpus
                   else inventory.error or "no NVIDIA GPU found")
            unplaced.append(Unplaced(m, r, f"needs {n} GPU(s); {why}"))
            continue
        if isinstance(m.gpus, list):
            picked = [_select(s, devices) for s in m.gpus]
            problem = next((p for p in picked if isinstance(p, str)), None)
            chosen = [p for p in picked if isinstance(p, _Device)]
            if problem is None and len({d.uuid for d in chosen}) < len(chosen):
                problem = "the same GPU is listed twice"
            if problem is None and len(chosen) > 1 and any(d.mig for d in chosen):
                problem = "a MIG instance cannot be combined with other devices (CUDA uses only the first)"
            if problem is None and not _fits(need, chosen):
                short = next(d for d, c in zip(chosen, _charges(need, chosen)) if d.room < c)
                problem = f"needs {gib(need)}; {short.label} has {gib(max(short.room, 0))} free"
            if problem is not None:
                unplaced.append(Unplaced(m, r, f"gpus = {m.gpus}: {problem}"))
                continue
        else:
            got = _choose(need, n, devices, m.placement)
            if got is None:
                unplaced.append(Unplaced(m, r, _why_not(need, n, devices)))
                continue
            chosen = got
        for d, c in zip(chosen, _charges(need, chosen)):
            d.charged += c
            d.tenants.append(first + len(placed))
        placed.append(Placed(m, r, tuple(d.uuid for d in chosen), None, need))
    return placed, unplaced


@dataclass(frozen=True)
class Resident:
    """A replica holding GPU memory now: its devices and what placement charges it on each."""

    gpu_uuids: tuple[str, ...]
    need_bytes: int


def foreign_use(inventory: Inventory, own_pids: set[int], residents: list[Resident]) -> dict[str, int]:
    """Bytes per device held by processes the node does not manage (NVML ground truth).

    With NVML's process list: memory in use minus what the node's own processes hold.
    Without it (MIG slices, or no list): memory in use minus what placement charged the
    node's replicas there, which counts a worker using more than its charge as foreign
    too (it holds that memory all the same)."""
    charged: dict[str, int] = {}
    for res in residents:
        for uuid in res.gpu_uuids:
            charged[uuid] = charged.get(uuid, 0) + res.need_bytes
    out: dict[str, int] = {}
    for g in inventory.gpus:
        units = [(d.uuid, d.memory_used, None) for d in g.mig_devices] if g.mig_mode else [(g.uuid, g.memory_used, g.processes)]
        for uuid, used, procs in units:
            if procs is not None:
                ours = sum(p.used_memory for p in procs if p.pid in own_pids)
                out[uuid] = max(0, used - ours)
            else:
                out[uuid] = max(0, used - charged.get(uuid, 0))
    return out


def place_on_demand(m: ModelConfig, lock: LockFile, inventory: Inventory, residents: list[Resident],
                    foreign: dict[str, int]) -> tuple[Placed, ...] | str:
    """Where every replica of on-demand model m runs now, around residents and foreign use; or why it cannot."""
    if m.gpu_count == 0:
        return tuple(Placed(m, r) for r in range(m.replicas))
    devices = _devices(inventory)
    by_uuid = {d.uuid: d for d in devices}
    for d in devices:
        d.charged += foreign.get(d.uuid, 0)
    for res in residents:
        held = [by_uuid[u] for u in res.gpu_uuids if u in by_uuid]
        if held:
            for d, c in zip(held, _charges(res.need_bytes, held)):
                d.charged += c
    placed, unplaced = _place_model(m, lock, inventory, devices, 0)
    if unplaced:
        return unplaced[0].reason
    return tuple(_fraction(p, devices) for p in placed)


def _fraction(p: Placed, devices: list[_Device]) -> Placed:
    smallest = min(d.total for d in devices if d.uuid in p.gpu_uuids)
    fraction = math.floor(p.need_bytes / smallest * 1000) / 1000
    # Floor keeps the sum of shares within the device; a share never rounds to zero.
    return Placed(p.model, p.replica, p.gpu_uuids, max(fraction, 0.001), p.need_bytes)


def _with_fractions(placed: list[Placed], devices: list[_Device], share_all: bool = False) -> list[Placed]:
    """Replicas sharing a device get their share; a replica alone keeps the runtime default
    (unless on-demand models may join it later: share_all)."""
    shared = {i for d in devices if len(d.tenants) > 1 or share_all for i in d.tenants}
    out: list[Placed] = []
    for i, p in enumerate(placed):
        out.append(_fraction(p, devices) if i in shared else p)
    return out
