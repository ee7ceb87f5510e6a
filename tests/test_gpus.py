"""NVML inventory against the pynvml stand-in (tests/fakes/nvml.py), and `infernode gpus`."""

from __future__ import annotations

import json
import subprocess
import sys

import pynvml
import pytest

from node.workers.gpus import NO_DRIVER, discover
from tests.fakes.nvml import FakeGpu, FakeNvml, GiB, box, mig_box


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_every_gpu_is_listed_with_its_figures(n: int) -> None:
    nvml = box(n)
    inv = discover(nvml)
    assert inv.error is None and inv.driver == "550.54.15"
    assert [g.index for g in inv.gpus] == list(range(n))
    assert len({g.uuid for g in inv.gpus}) == n
    for g, fake in zip(inv.gpus, nvml.gpus):
        assert g.name == fake.name and g.uuid == fake.uuid
        assert g.memory_total == int(fake.memory_gib * GiB)
        assert g.memory_used + g.memory_free == g.memory_total
        assert g.compute_capability == f"{fake.compute_capability[0]}.{fake.compute_capability[1]}"
    assert nvml.initialised == 0 and nvml.shutdowns == 1  # NVML is released again


def test_utilisation_temperature_and_power_are_converted() -> None:
    inv = discover(FakeNvml.with_gpus(FakeGpu("NVIDIA L4", 24, used_gib=6, utilization_pct=37, temperature_c=61, power_mw=72_500)))
    g = inv.gpus[0]
    assert g.utilization == pytest.approx(0.37)
    assert g.temperature_c == 61.0
    assert g.power_w == pytest.approx(72.5)
    assert g.memory_used == 6 * GiB and g.memory_free == 18 * GiB
    assert g.mig_mode is False and g.mig_devices == ()


def test_mig_instances_are_listed_under_their_gpu() -> None:
    inv = discover(mig_box())
    split, whole = inv.gpus
    assert split.mig_mode is True and whole.mig_mode is False
    assert [d.name.rsplit(" ", 1)[1] for d in split.mig_devices] == ["3g.20gb", "2g.10gb", "2g.10gb"]
    assert all(d.uuid.startswith("MIG-") for d in split.mig_devices)
    assert split.mig_devices[2].memory_used == 2 * GiB
    assert split.utilization is None  # NVML does not report it for a GPU in MIG mode
    assert split.as_dict()["mig_devices"][0]["memory_total"] == int(19.5 * GiB)


def test_no_driver_is_a_normal_state() -> None:
    inv = discover(FakeNvml.no_driver())
    assert inv.gpus == () and inv.driver is None
    assert inv.error is not None and inv.error.startswith(NO_DRIVER)


def test_driver_without_gpus_says_so() -> None:
    inv = discover(FakeNvml.with_gpus())
    assert inv.gpus == () and inv.driver == "550.54.15" and inv.error == "no NVIDIA GPU found"


def test_a_lost_gpu_does_not_hide_the_others() -> None:
    nvml = box(2)
    nvml.gpus[0].lost = True
    inv = discover(nvml)
    assert [g.index for g in inv.gpus] == [1]
    assert inv.error == "GPU 0: NVML: GPU is lost"


def test_the_real_pynvml_on_this_box() -> None:
    """On a box without the driver the real module must give the same plain state."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        inv = discover(pynvml)
        assert inv.gpus == () and inv.error is not None and inv.error.startswith(NO_DRIVER)
        return
    pynvml.nvmlShutdown()
    inv = discover(pynvml)  # a real GPU box: the figures must be real
    assert inv.error is None and inv.gpus and all(g.memory_total > 0 and g.uuid.startswith("GPU-") for g in inv.gpus)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "gpus", *args], capture_output=True, text=True, timeout=120)


def test_gpus_command_json_matches_discover() -> None:
    out = _cli("--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data == json.loads(json.dumps(discover().as_dict()))
    if not data["gpus"]:
        assert data["error"]


def test_gpus_command_table_says_why_there_are_none() -> None:
    inv = discover()
    out = _cli()
    assert out.returncode == 0, out.stderr
    if inv.gpus:  # the table may wrap long UUIDs, so check the title line
        assert f"driver {inv.driver}" in out.stdout
    else:
        assert inv.error and inv.error.split(" (")[0] in out.stdout


def test_gpus_table_on_a_fake_box_lists_mig_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table `infernode gpus` prints, with NVML swapped for the stand-in under its import name."""
    from typer.testing import CliRunner

    import node.cli  # noqa: F401  (adds every command to the root)
    from node.cli.root import app, console

    fake = mig_box()
    fake.gpus[1].utilization_pct, fake.gpus[1].temperature_c, fake.gpus[1].power_mw = 42, 55, 88_000
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(console, "width", 250)
    out = CliRunner().invoke(app, ["gpus"])
    assert out.exit_code == 0, out.output
    assert "driver 550.54.15" in out.output
    for g in fake.gpus:
        assert g.uuid in out.output
    for m in fake.gpus[0].mig or []:
        assert m.uuid in out.output and "MIG " + m.name.rsplit(" ", 1)[1] in out.output
    row = next(line for line in out.output.splitlines() if fake.gpus[1].uuid in line)
    assert "42%" in row and "55°C" in row and "88 W" in row and "0.0/40.0 GiB" in row and "off" in row
    assert CliRunner().invoke(app, ["gpus", "--json"]).output.count("MIG-") == 3
