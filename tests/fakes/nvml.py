"""A stand-in for the few `pynvml` (nvidia-ml-py) calls node/workers/gpus.py makes.

It follows nvidia-ml-py's module (pynvml.py, NVML API reference at
docs.nvidia.com/deploy/nvml-api): `nvmlInit` raises `NVMLError_LibraryNotFound`
(value 12, "NVML Shared Library Not Found") on a box without the driver;
`nvmlDeviceGetMemoryInfo` returns an object with `total`, `free`, `used` in bytes;
`nvmlDeviceGetUtilizationRates(h).gpu` is a percentage; `nvmlDeviceGetPowerUsage` is in
milliwatts; `nvmlDeviceGetCudaComputeCapability` is `(major, minor)`;
`nvmlDeviceGetMigMode` is `[current, pending]` and raises NotSupported on GPUs without
MIG; MIG slots without an instance raise `NVMLError_NotFound`; queries a MIG slice does
not support raise `NVMLError_NotSupported`.

Use: `FakeNvml.with_gpus(FakeGpu("NVIDIA A100-SXM4-80GB", 80), ...)` and pass the
object where the `pynvml` module would go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

GiB = 1024 ** 3
NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    """Base class, as in pynvml: `value` is the NVML return code."""

    value = 999
    text = "Unknown Error"

    def __str__(self) -> str:
        return self.text


class NVMLError_Uninitialized(NVMLError):
    value, text = 1, "Uninitialized"


class NVMLError_NotSupported(NVMLError):
    value, text = 3, "Not Supported"


class NVMLError_NotFound(NVMLError):
    value, text = 6, "Not Found"


class NVMLError_DriverNotLoaded(NVMLError):
    value, text = 9, "Driver Not Loaded"


class NVMLError_LibraryNotFound(NVMLError):
    value, text = 12, "NVML Shared Library Not Found"


class NVMLError_GpuIsLost(NVMLError):
    value, text = 15, "GPU is lost"


@dataclass
class FakeMig:
    """One MIG instance on a fake GPU."""

    name: str          # e.g. "NVIDIA A100-SXM4-40GB MIG 3g.20gb"
    memory_gib: float
    used_gib: float = 0.0
    uuid: str = ""


@dataclass
class FakeGpu:
    """One fake physical GPU."""

    name: str
    memory_gib: float
    used_gib: float = 0.0
    utilization_pct: int = 0
    temperature_c: int = 40
    power_mw: int = 70_000
    compute_capability: tuple[int, int] = (8, 0)
    mig: list[FakeMig] | None = None   # None: no MIG support; []: supported, disabled
    mig_enabled: bool | None = None    # True with mig=[]: MIG mode on, no instances made yet
    mig_slots: int = 7
    uuid: str = ""
    lost: bool = False                 # fell off the bus: every query raises GpuIsLost
    # Compute processes as (pid, GiB); their memory counts in `used` on top of used_gib
    # (which is memory no process is charged for, e.g. the driver's own).
    processes: list[tuple[int, float]] = field(default_factory=list)
    processes_supported: bool = True   # False: nvmlDeviceGetComputeRunningProcesses raises NotSupported


@dataclass
class FakeNvml:
    """The fake `pynvml` module: pass it to `node.gpus.discover`."""

    gpus: list[FakeGpu] = field(default_factory=list)
    driver: str = "550.54.15"
    init_error: type[NVMLError] | None = None
    initialised: int = 0
    shutdowns: int = 0

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE

    @classmethod
    def with_gpus(cls, *gpus: FakeGpu) -> FakeNvml:
        for i, g in enumerate(gpus):
            g.uuid = g.uuid or f"GPU-{i:08x}-1111-2222-3333-{i:012x}"
            for j, m in enumerate(g.mig or []):
                m.uuid = m.uuid or f"MIG-{i:08x}-{j:04x}-4444-5555-{j:012x}"
        return cls(gpus=list(gpus))

    @classmethod
    def no_driver(cls) -> FakeNvml:
        return cls(init_error=NVMLError_LibraryNotFound)

    # -- the pynvml calls ------------------------------------------------------
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error()
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdowns += 1
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        self._check()
        if not 0 <= i < len(self.gpus):
            raise NVMLError_NotFound()  # pynvml raises InvalidArgument; NotFound is close enough here
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu | FakeMig) -> str:
        if isinstance(h, FakeGpu) and h.lost:
            raise NVMLError_GpuIsLost()
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu | FakeMig) -> str:
        return h.name

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu | FakeMig) -> Any:
        procs = sum(gib for _, gib in h.processes) if isinstance(h, FakeGpu) else 0.0
        total, used = int(h.memory_gib * GiB), int((h.used_gib + procs) * GiB)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[Any]:
        """pynvml's c_nvmlProcessInfo_t list: `pid`, `usedGpuMemory` in bytes."""
        if not h.processes_supported:
            raise NVMLError_NotSupported()
        return [SimpleNamespace(pid=pid, usedGpuMemory=int(gib * GiB), gpuInstanceId=0xFFFFFFFF,
                                computeInstanceId=0xFFFFFFFF) for pid, gib in h.processes]

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu | FakeMig) -> Any:
        if isinstance(h, FakeMig) or (isinstance(h, FakeGpu) and h.mig):
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=h.utilization_pct, memory=0)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return h.temperature_c

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        return h.power_mw

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:
        return h.compute_capability

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> list[int]:
        if h.mig is None:
            raise NVMLError_NotSupported()
        on = bool(h.mig) if h.mig_enabled is None else h.mig_enabled
        mode = NVML_DEVICE_MIG_ENABLE if on else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        if h.mig is None:
            raise NVMLError_NotSupported()
        return h.mig_slots

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, slot: int) -> FakeMig:
        if not h.mig or slot >= len(h.mig):
            raise NVMLError_NotFound()
        return h.mig[slot]

    def _check(self) -> None:
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()


def box(n: int) -> FakeNvml:
    """A fake box with 1, 2, 4 or 8 GPUs of mixed sizes (some memory already in use)."""
    layouts: dict[int, list[FakeGpu]] = {
        1: [FakeGpu("NVIDIA L4", 24, used_gib=0.5, compute_capability=(8, 9))],
        2: [FakeGpu("NVIDIA A100-SXM4-80GB", 80, used_gib=1), FakeGpu("NVIDIA L4", 24, compute_capability=(8, 9))],
        4: [FakeGpu("NVIDIA A100-SXM4-80GB", 80), FakeGpu("NVIDIA A100-SXM4-80GB", 80, used_gib=57),
            FakeGpu("NVIDIA A10", 24, compute_capability=(8, 6)), FakeGpu("NVIDIA A10", 24, compute_capability=(8, 6))],
        8: [FakeGpu("NVIDIA H100 80GB HBM3", 80, compute_capability=(9, 0)) for _ in range(6)]
        + [FakeGpu("NVIDIA L40S", 48, compute_capability=(8, 9)), FakeGpu("NVIDIA L40S", 48, compute_capability=(8, 9))],
    }
    return FakeNvml.with_gpus(*layouts[n])


def mig_box() -> FakeNvml:
    """One A100-40GB split into MIG 3g.20gb + 2x 2g.10gb, beside one whole A100-40GB."""
    return FakeNvml.with_gpus(
        FakeGpu("NVIDIA A100-SXM4-40GB", 40, mig=[FakeMig("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19.5),
                                                  FakeMig("NVIDIA A100-SXM4-40GB MIG 2g.10gb", 9.75),
                                                  FakeMig("NVIDIA A100-SXM4-40GB MIG 2g.10gb", 9.75, used_gib=2)]),
        FakeGpu("NVIDIA A100-SXM4-40GB", 40, mig=[]),
    )
