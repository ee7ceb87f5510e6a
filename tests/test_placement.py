"""Placement as a pure function of (config, lock, inventory), on fake boxes of 1-8 GPUs and MIG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.config import GiB, parse_config, parse_size
from node.errors import ConfigError
from node.supply.lockfile import LockedFile, LockEntry, LockFile
from node.workers.gpus import Inventory, discover
from node.workers.placement import estimate_need, place
from tests.fakes.nvml import FakeGpu, FakeNvml, box, mig_box


def cfg(*models: dict[str, Any]) -> Any:
    raw = {"models": [{"source": "hf:org/" + m["name"], "runtime": "vllm", **m} for m in models]}
    return parse_config(raw, Path("/tmp/appliance.toml"))


def lock(**sizes_gib: float) -> LockFile:
    return LockFile(models=[LockEntry(name=n.replace("_", "-"), source="hf:x", revision="r",
                                      files=[LockedFile(path="model.safetensors", size=int(s * GiB), sha256="a" * 64)])
                            for n, s in sizes_gib.items()])


def test_parse_size_units() -> None:
    assert parse_size("20GiB") == 20 * GiB
    assert parse_size("20 GB") == 20 * 10 ** 9
    assert parse_size("512MiB") == 512 * 1024 ** 2
    assert parse_size("1.5gib") == int(1.5 * GiB)
    for bad in ("20", "lots", "20 parsecs", ""):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_size(bad)


def test_bad_gpu_memory_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        cfg({"name": "a", "gpus": 1, "gpu_memory": "twenty"})
    assert "gpu_memory" in str(e.value) and "20GiB" in str(e.value)


def test_estimate_is_weights_plus_kv_reserve_plus_cuda_context() -> None:
    # 16 GiB of weights on one GPU: 16 * 1.25 + 1 = 21 GiB; split over 2 GPUs: 8 * 1.25 + 1 = 11 GiB.
    assert estimate_need(16 * GiB, 1) == 21 * GiB
    assert estimate_need(16 * GiB, 2) == 11 * GiB
    assert estimate_need(0, 1) == 1 * GiB


def test_cpu_and_external_models_need_no_gpu() -> None:
    c = parse_config({"models": [{"name": "cpu", "source": "builtin:tiny-chat", "runtime": "llamacpp"},
                                 {"name": "ext", "runtime": "external", "url": "http://h:1/v1"}]}, Path("/tmp/a.toml"))
    p = place(c, LockFile(), discover(FakeNvml.no_driver()))
    assert [(x.model.name, x.gpu_uuids) for x in p.placed] == [("cpu", ()), ("ext", ())] and p.unplaced == ()


def test_no_driver_makes_gpu_models_unplaceable_with_the_reason() -> None:
    p = place(cfg({"name": "big", "gpus": 1}), lock(big=10), discover(FakeNvml.no_driver()))
    assert p.placed == ()
    assert "no NVIDIA driver found" in p.unplaced[0].reason and "needs 1 GPU" in p.unplaced[0].reason


def test_too_big_for_any_gpu_says_how_much_is_free() -> None:
    inv = discover(box(1))  # one 24 GiB L4: 22.8 GiB placeable
    p = place(cfg({"name": "big", "gpus": 1, "gpu_memory": "40GiB"}), LockFile(), inv)
    assert p.placed == ()
    assert p.unplaced[0].reason == "needs 40 GiB; the largest free GPU has 22.8 GiB (GPU 0)"


def test_binpack_fills_one_gpu_before_the_next_and_shares_by_fraction() -> None:
    inv = discover(box(2))  # GPU 0: 80 GiB A100, GPU 1: 24 GiB L4
    c = cfg({"name": "a", "gpus": 1, "gpu_memory": "20GiB", "replicas": 3})
    p = place(c, LockFile(), inv)
    a100, l4 = inv.gpus[0].uuid, inv.gpus[1].uuid
    # Best fit: the first goes to the L4 (fullest that fits), then the A100 takes the others.
    assert [x.gpu_uuids for x in p.placed] == [(l4,), (a100,), (a100,)]
    assert p.placed[0].gpu_memory_fraction is None          # alone: runtime default
    assert p.placed[1].gpu_memory_fraction == p.placed[2].gpu_memory_fraction == 0.25  # 20 of 80 GiB


def test_spread_puts_replicas_on_the_emptiest_gpus() -> None:
    inv = discover(box(4))  # 80, 80 (57 used, ignored: placement uses capacity), 24, 24
    c = cfg({"name": "a", "gpus": 1, "gpu_memory": "10GiB", "replicas": 4, "placement": "spread"})
    p = place(c, LockFile(), inv)
    assert sorted(x.gpu_uuids[0] for x in p.placed) == sorted(g.uuid for g in inv.gpus)
    assert all(x.gpu_memory_fraction is None for x in p.placed)


def test_binpack_keeps_replicas_together() -> None:
    inv = discover(box(4))
    c = cfg({"name": "a", "gpus": 1, "gpu_memory": "10GiB", "replicas": 4})
    p = place(c, LockFile(), inv)
    assert len({x.gpu_uuids for x in p.placed}) == 2  # two per 24 GiB A10
    fractions = {x.gpu_memory_fraction for x in p.placed}
    assert fractions == {0.416}  # floor(10 / 24, 3 places)


def test_tensor_parallel_gets_n_gpus_of_one_size() -> None:
    inv = discover(box(8))  # six H100 80 GiB, two L40S 48 GiB
    c = cfg({"name": "llama-70b", "gpus": 4}, {"name": "small", "gpus": 2, "gpu_memory": "30GiB"})
    p = place(c, lock(llama_70b=140), inv)
    big = next(x for x in p.placed if x.model.name == "llama-70b")
    assert big.need_bytes == estimate_need(140 * GiB, 4) and len(big.gpu_uuids) == 4
    h100 = {g.uuid for g in inv.gpus if "H100" in g.name}
    assert set(big.gpu_uuids) <= h100
    small = next(x for x in p.placed if x.model.name == "small")
    assert len(set(small.gpu_uuids)) == 2
    assert p.unplaced == ()


def test_tensor_parallel_on_too_few_gpus() -> None:
    p = place(cfg({"name": "a", "gpus": 4}), lock(a=1), discover(box(2)))
    assert p.unplaced[0].reason == "needs 4 GPUs; this box has 2 whole GPU(s)"


def test_tensor_parallel_without_enough_memory_on_enough_gpus() -> None:
    p = place(cfg({"name": "a", "gpus": 2, "gpu_memory": "40GiB"}), LockFile(), discover(box(2)))
    assert p.unplaced[0].reason.startswith("needs 40 GiB on each of 2 GPUs; 1 GPU(s) have that much free")


def test_explicit_indices_and_uuids() -> None:
    inv = discover(box(4))
    c = cfg({"name": "by-index", "gpus": [2, 3], "gpu_memory": "8GiB"},
            {"name": "by-uuid", "gpus": [inv.gpus[0].uuid], "gpu_memory": "8GiB"},
            {"name": "counted", "gpus": 1, "gpu_memory": "70GiB"})
    p = place(c, LockFile(), inv)
    got = {x.model.name: x.gpu_uuids for x in p.placed}
    assert got["by-index"] == (inv.gpus[2].uuid, inv.gpus[3].uuid)
    assert got["by-uuid"] == (inv.gpus[0].uuid,)
    assert got["counted"] == (inv.gpus[1].uuid,)  # explicit ones were placed first; GPU 0 lost 8 GiB


def test_explicit_selection_problems_are_reasons() -> None:
    inv = discover(box(2))
    c = cfg({"name": "a", "gpus": [7]}, {"name": "b", "gpus": ["GPU-nope"]}, {"name": "c", "gpus": [1], "gpu_memory": "30GiB"},
            {"name": "d", "gpus": [0, "0"]})
    p = place(c, LockFile(), inv)
    reasons = {u.model.name: u.reason for u in p.unplaced}
    assert reasons["a"] == "gpus = [7]: no GPU with index 7 (this box has GPUs 0-1)"
    assert reasons["b"] == "gpus = ['GPU-nope']: no GPU or MIG instance with UUID GPU-nope"
    assert reasons["c"] == "gpus = [1]: needs 30 GiB; GPU 1 has 22.8 GiB free"
    assert reasons["d"].endswith("the same GPU is listed twice")


def test_mig_instances_are_placed_on_one_at_a_time() -> None:
    inv = discover(mig_box())
    mig = inv.gpus[0].mig_devices
    c = cfg({"name": "small", "gpus": 1, "gpu_memory": "8GiB", "replicas": 2},
            {"name": "by-mig", "gpus": [mig[0].uuid], "gpu_memory": "16GiB"},
            {"name": "tp", "gpus": 2, "gpu_memory": "8GiB"})
    p = place(c, LockFile(), inv)
    got = {(x.model.name, x.replica): x.gpu_uuids for x in p.placed}
    assert got[("by-mig", 0)] == (mig[0].uuid,)
    # Binpack puts the 8 GiB replicas on the 9.75 GiB slices, one each (8 + 8 does not fit 9.26).
    assert {got[("small", 0)][0], got[("small", 1)][0]} == {mig[1].uuid, mig[2].uuid}
    # Tensor parallel cannot combine MIG slices, and only one whole GPU is left.
    assert "MIG instances cannot be combined" in next(u.reason for u in p.unplaced if u.model.name == "tp")


def test_gpu_in_mig_mode_cannot_be_named_whole() -> None:
    p = place(cfg({"name": "a", "gpus": [0]}), lock(a=1), discover(mig_box()))
    assert "GPU 0 is in MIG mode" in p.unplaced[0].reason


def test_placement_is_deterministic_and_ignores_live_usage() -> None:
    """Our own running workers' memory must not move them on reload or adoption."""
    c = cfg({"name": "a", "gpus": 1, "gpu_memory": "60GiB"}, {"name": "b", "gpus": 1, "gpu_memory": "20GiB"})
    idle = FakeNvml.with_gpus(FakeGpu("NVIDIA A100-SXM4-80GB", 80))
    busy = FakeNvml.with_gpus(FakeGpu("NVIDIA A100-SXM4-80GB", 80, used_gib=75))
    assert place(c, LockFile(), discover(idle)) == place(c, LockFile(), discover(busy))


def test_adding_a_model_does_not_move_earlier_ones() -> None:
    inv = discover(box(4))
    first = [{"name": "a", "gpus": 1, "gpu_memory": "20GiB"}, {"name": "b", "gpus": 1, "gpu_memory": "20GiB"}]
    before = {x.model.name: x.gpu_uuids for x in place(cfg(*first), LockFile(), inv).placed}
    after = {x.model.name: x.gpu_uuids for x in place(cfg(*first, {"name": "c", "gpus": 1, "gpu_memory": "5GiB"}), LockFile(), inv).placed}
    assert {k: after[k] for k in before} == before


def test_shares_on_a_device_never_exceed_it() -> None:
    inv = discover(box(8))
    c = cfg(*({"name": f"m{i}", "gpus": 1, "gpu_memory": f"{5 + 3 * i}GiB", "replicas": 2} for i in range(8)))
    p = place(c, LockFile(), inv)
    by_uuid: dict[str, float] = {}
    for x in p.placed:
        if x.gpu_memory_fraction is not None:
            by_uuid[x.gpu_uuids[0]] = by_uuid.get(x.gpu_uuids[0], 0) + x.gpu_memory_fraction
    assert by_uuid and all(total <= 0.95 for total in by_uuid.values())
    assert len(p.placed) + len(p.unplaced) == 16


def test_empty_inventory_without_error_text() -> None:
    p = place(cfg({"name": "a", "gpus": 1}), lock(a=1), Inventory(()))
    assert p.unplaced[0].reason == "needs 1 GPU(s); no NVIDIA GPU found"


def test_mig_mode_without_instances() -> None:
    p = place(cfg({"name": "a", "gpus": 1}), lock(a=1), discover(FakeNvml.with_gpus(FakeGpu("NVIDIA A100-SXM4-40GB", 40, mig=[], mig_enabled=True))))
    assert p.unplaced[0].reason == "needs 1 GPU(s); every GPU is in MIG mode without MIG instances"
