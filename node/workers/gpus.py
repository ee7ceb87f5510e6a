"""GPU inventory through NVML (nvidia-ml-py); no driver or no GPU is a normal state.

`discover(nvml)` takes the `pynvml` module as a parameter so tests pass a fake of the
few calls used here; production passes nothing and the real module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")
NO_DRIVER = "no NVIDIA driver found"
# NVML's own constants, repeated so a fake need not define them.
_TEMPERATURE_GPU = 0
_MIG_ENABLE = 1


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance: a separately addressable slice of a GPU (CUDA_VISIBLE_DEVICES=MIG-...)."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU and the memory NVML says it holds there."""

    pid: int
    used_memory: int


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: float | None = None       # 0..1
    temperature_c: float | None = None
    power_w: float | None = None
    compute_capability: str | None = None  # "8.0"
    mig_mode: bool = False
    mig_devices: tuple[MigDevice, ...] = ()
    # Compute processes and their memory; None when NVML cannot say (then placement
    # counts what is in use beyond its own charges as held by others).
    processes: tuple[GpuProcess, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inventory:
    """Every GPU on the box, or why there are none."""

    gpus: tuple[Gpu, ...]
    driver: str | None = None
    error: str | None = None   # why there is no (or a partial) inventory ("no NVIDIA driver found")

    def as_dict(self) -> dict[str, Any]:
        return {"driver": self.driver, "error": self.error, "gpus": [g.as_dict() for g in self.gpus]}


def discover(nvml: Any = None) -> Inventory:
    """Read every GPU through NVML; `nvml` is the pynvml module (a fake in tests)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return Inventory((), error="nvidia-ml-py is not installed: pip install nvidia-ml-py")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Inventory((), error=_init_failure(nvml, exc))
    try:
        driver = _s(nvml.nvmlSystemGetDriverVersion())
        count = nvml.nvmlDeviceGetCount()
        gpus: list[Gpu] = []
        problems: list[str] = []
        for i in range(count):
            try:
                gpus.append(_gpu(nvml, i))
            except nvml.NVMLError as exc:  # one lost GPU must not hide the others
                problems.append(f"GPU {i}: NVML: {exc}")
        error = "; ".join(problems) or (None if gpus else "no NVIDIA GPU found")
        return Inventory(tuple(gpus), driver=driver, error=error)
    except nvml.NVMLError as exc:
        return Inventory((), error=f"NVML: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _init_failure(nvml: Any, exc: Exception) -> str:
    """A no-driver box is a normal state with a plain reason; other NVML errors name themselves."""
    missing = tuple(c for c in (getattr(nvml, "NVMLError_LibraryNotFound", None),
                                getattr(nvml, "NVMLError_DriverNotLoaded", None)) if c is not None)
    if missing and isinstance(exc, missing):
        return f"{NO_DRIVER} ({exc})"
    return f"NVML: {exc}"


def _optional(nvml: Any, call: Callable[[], T]) -> T | None:
    """A query some GPUs do not support (NotSupported, or MIG slices) is just unknown."""
    try:
        return call()
    except nvml.NVMLError:
        return None


def _gpu(nvml: Any, i: int) -> Gpu:
    h = nvml.nvmlDeviceGetHandleByIndex(i)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    util = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
    temp = _optional(nvml, lambda: nvml.nvmlDeviceGetTemperature(h, _TEMPERATURE_GPU))
    power_mw = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(h))
    cc = _optional(nvml, lambda: nvml.nvmlDeviceGetCudaComputeCapability(h))
    mig = _optional(nvml, lambda: nvml.nvmlDeviceGetMigMode(h))
    mig_on = bool(mig and mig[0] == _MIG_ENABLE)
    return Gpu(
        index=i, uuid=_s(nvml.nvmlDeviceGetUUID(h)), name=_s(nvml.nvmlDeviceGetName(h)),
        memory_total=int(mem.total), memory_used=int(mem.used), memory_free=int(mem.free),
        utilization=None if util is None else util / 100.0,
        temperature_c=None if temp is None else float(temp),
        power_w=None if power_mw is None else power_mw / 1000.0,
        compute_capability=None if cc is None else f"{cc[0]}.{cc[1]}",
        mig_mode=mig_on,
        mig_devices=_mig_devices(nvml, h) if mig_on else (),
        processes=None if mig_on else _optional(nvml, lambda: _processes(nvml, h)),
    )


def _processes(nvml: Any, h: Any) -> tuple[GpuProcess, ...] | None:
    """NVML's compute processes on a GPU; None when a process's memory is not available."""
    out = []
    for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
        used = getattr(p, "usedGpuMemory", None)
        if used is None:  # NVML_VALUE_NOT_AVAILABLE (e.g. under some virtualisation)
            return None
        out.append(GpuProcess(int(p.pid), int(used)))
    return tuple(out)


def _mig_devices(nvml: Any, h: Any) -> tuple[MigDevice, ...]:
    """The MIG instances configured on a GPU; empty slots raise NotFound and are skipped."""
    found: list[MigDevice] = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
        try:
            m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
        except nvml.NVMLError:
            continue
        mem = nvml.nvmlDeviceGetMemoryInfo(m)
        found.append(MigDevice(index=slot, uuid=_s(nvml.nvmlDeviceGetUUID(m)), name=_s(nvml.nvmlDeviceGetName(m)),
                               memory_total=int(mem.total), memory_used=int(mem.used), memory_free=int(mem.free)))
    return tuple(found)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
