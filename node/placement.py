"""Placement: a pure function of (config, lock, GPU inventory) -> desired replicas."""

from __future__ import annotations

from dataclasses import dataclass

from node.config import Config, ModelConfig
from node.gpus import Inventory
from node.lockfile import LockFile


@dataclass(frozen=True)
class Placed:
    model: ModelConfig
    replica: int
    gpu_uuids: tuple[str, ...] = ()
    gpu_memory_fraction: float | None = None


@dataclass(frozen=True)
class Unplaced:
    model: ModelConfig
    replica: int
    reason: str


@dataclass(frozen=True)
class Placement:
    placed: tuple[Placed, ...]
    unplaced: tuple[Unplaced, ...]


def place(config: Config, lock: LockFile, inventory: Inventory) -> Placement:
    """Where each replica runs; replicas that cannot run are listed with the reason."""
    placed: list[Placed] = []
    unplaced: list[Unplaced] = []
    for m in config.models:
        for r in range(m.replicas):
            if m.runtime == "external" or m.gpu_count == 0:
                placed.append(Placed(m, r))
            elif not inventory.gpus:
                unplaced.append(Unplaced(m, r, f"needs {m.gpu_count} GPU(s); {inventory.error or 'no GPU found'}"))
            else:
                uuids = tuple(g.uuid for g in inventory.gpus[: m.gpu_count])
                if len(uuids) < m.gpu_count:
                    unplaced.append(Unplaced(m, r, f"needs {m.gpu_count} GPUs; this box has {len(inventory.gpus)}"))
                else:
                    placed.append(Placed(m, r, uuids))
    return Placement(tuple(placed), tuple(unplaced))
