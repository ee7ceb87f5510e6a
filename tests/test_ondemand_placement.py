"""GPU-memory-aware loading with the NVML stand-in: a node (in process, real llama.cpp
workers on CPU) that believes it has one 24 GiB GPU. Loads fit around what is resident,
the least recently used idle on-demand model is evicted when one does not fit, memory
a foreign process holds counts, and a model that cannot fit even on an empty GPU is
refused (503 model_not_ready) without evicting anything. The pure placement functions
are checked beside it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.app import Node
from node.config import load_config
from node.errors import NoReadyReplica
from node.supply.lockfile import LockFile
from node.workers.gpus import discover
from node.workers.placement import GiB, Resident, foreign_use, place_on_demand
from node.workers.states import WorkerState
from tests.conftest import run_cli, write_config
from tests.fakes.nvml import FakeGpu, FakeNvml

S = WorkerState
FOREIGN_PID = 2 ** 22 + 17   # above pid_max's default: never one of the node's processes


def gpu_model(name: str, memory: str = "8GiB") -> str:
    return f"""
[[models]]
name = "{name}"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
args = ["-t", "1"]
load = "on_demand"
gpus = 1
gpu_memory = "{memory}"
"""


class DriverView(FakeNvml):
    """The stand-in as a driver would report this node: each live worker holds what it was charged."""

    node: Node | None = None

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list:
        self._sync(h)
        return super().nvmlDeviceGetComputeRunningProcesses(h)

    def nvmlDeviceGetMemoryInfo(self, h):
        if isinstance(h, FakeGpu):
            self._sync(h)
        return super().nvmlDeviceGetMemoryInfo(h)

    def _sync(self, h: FakeGpu) -> None:
        ours = []
        if self.node is not None and self.node.supervisor is not None:
            for r in self.node.supervisor.replicas.values():
                if r.worker_pid and h.uuid in r.spec.gpu_uuids and r.keeper is not None and r.keeper.alive():
                    ours.append((r.worker_pid, r.need_bytes / GiB))
        h.processes = [p for p in h.processes if p[0] == FOREIGN_PID] + ours


def states(node: Node) -> dict[str, str]:
    assert node.supervisor is not None
    return {r.spec.model: r.state.value for r in node.supervisor.replicas.values()}


def test_memory_aware_eviction_counts_a_foreign_process(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, gpu_model("a") + gpu_model("b") + gpu_model("c") + gpu_model("huge", "30GiB"))
    run_cli("lock", config=cfg, check=True)
    nvml = DriverView.with_gpus(FakeGpu("NVIDIA L4", 24, used_gib=0.5, compute_capability=(8, 9)))
    evicted: list[str] = []

    async def main() -> None:
        node = Node(load_config(cfg), nvml=nvml)
        nvml.node = node
        await node.open()
        try:
            await node.start_workers()
            assert node.loader is not None
            node.loader.on_evict = evicted.append
            await asyncio.sleep(0.2)  # the replicas' tasks settle in `unloaded`
            assert set(states(node).values()) == {"unloaded"}
            # 22.8 GiB usable (95 %), 0.5 GiB held by the driver: two 8 GiB models fit, a third does not.
            await node.loader.ensure_loaded("a")
            await node.loader.ensure_loaded("b")
            assert states(node) == {"a": "ready", "b": "ready", "c": "unloaded", "huge": "unloaded"}
            assert evicted == []
            await node.loader.ensure_loaded("c")  # a is the least recently used: it goes
            assert evicted == ["a"]
            assert states(node)["a"] == "unloaded" and states(node)["b"] == "ready" and states(node)["c"] == "ready"
            reps = {r.spec.model: r for r in node.supervisor.replicas.values()}
            gpu = nvml.gpus[0].uuid
            assert reps["c"].spec.gpu_uuids == (gpu,) and reps["c"].spec.gpu_memory_fraction == 0.333

            # Another program takes 7 GiB of the GPU: now one 8 GiB model fits beside it, not two.
            nvml.gpus[0].processes.append((FOREIGN_PID, 7.0))
            await node.loader.ensure_loaded("a")
            assert evicted == ["a", "b", "c"]
            assert states(node) == {"a": "ready", "b": "unloaded", "c": "unloaded", "huge": "unloaded"}

            # Too big for the GPU even when empty: refused at once, nothing unloaded for it.
            with pytest.raises(NoReadyReplica) as e:
                await node.loader.ensure_loaded("huge")
            assert "needs 30 GiB" in e.value.message and e.value.headers["retry-after"] == "30"
            assert not e.value.retryable   # only an operator can help: clients get x-should-retry: false
            assert states(node)["a"] == "ready" and evicted == ["a", "b", "c"]

            # The foreign process exits: two fit again, nothing is evicted.
            nvml.gpus[0].processes = [p for p in nvml.gpus[0].processes if p[0] != FOREIGN_PID]
            await node.loader.ensure_loaded("b")
            assert states(node)["a"] == "ready" and states(node)["b"] == "ready"
            assert evicted == ["a", "b", "c"]
        finally:
            await node.shutdown()

    asyncio.run(main())


def test_foreign_use_from_nvml_processes_or_from_charges() -> None:
    nvml = FakeNvml.with_gpus(FakeGpu("NVIDIA L4", 24, used_gib=0.5), FakeGpu("NVIDIA L4", 24, used_gib=3))
    g0, g1 = nvml.gpus
    g0.processes = [(100, 8.0), (999, 4.0)]   # 100 is ours, 999 is not
    g1.processes_supported = False            # no process list: what exceeds our charges is foreign
    inv = discover(nvml)
    assert inv.gpus[0].processes is not None and inv.gpus[1].processes is None
    residents = [Resident((g0.uuid,), 8 * GiB), Resident((g1.uuid,), 2 * GiB)]
    foreign = foreign_use(inv, {100}, residents)
    assert foreign[g0.uuid] == int(4.5 * GiB)   # the other process and the driver's own
    assert foreign[g1.uuid] == 1 * GiB          # 3 GiB in use, 2 GiB of it ours by charge


def test_place_on_demand_around_residents_and_foreign_memory(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, gpu_model("a", "10GiB")))
    m = cfg.models[0]
    inv = discover(FakeNvml.with_gpus(FakeGpu("NVIDIA L4", 24), FakeGpu("NVIDIA A10", 24)))
    u0, u1 = (g.uuid for g in inv.gpus)
    # binpack: the fuller GPU that still has room.
    placed = place_on_demand(m, LockFile(), inv, [Resident((u1,), 8 * GiB)], {})
    assert not isinstance(placed, str) and placed[0].gpu_uuids == (u1,)
    # foreign memory on GPU 1 leaves room only on GPU 0.
    placed = place_on_demand(m, LockFile(), inv, [Resident((u1,), 8 * GiB)], {u1: 6 * GiB})
    assert not isinstance(placed, str) and placed[0].gpu_uuids == (u0,)
    why = place_on_demand(m, LockFile(), inv, [Resident((u0,), 14 * GiB)], {u1: 14 * GiB})
    assert isinstance(why, str) and "needs 10 GiB" in why

