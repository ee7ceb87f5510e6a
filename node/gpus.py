"""GPU inventory through NVML (nvidia-ml-py); no driver or no GPU is a normal state."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: float | None = None       # 0..1
    temperature_c: float | None = None
    power_w: float | None = None
    compute_capability: str | None = None
    mig_mode: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    driver: str | None = None
    error: str | None = None   # why there is no inventory ("no NVIDIA driver found")


def discover(nvml: Any = None) -> Inventory:
    """Read every GPU through NVML; `nvml` is the pynvml module (a fake in tests)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return Inventory((), error="nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        reason = "no NVIDIA driver found" if "Library Not Found" in str(exc) or "Driver Not Loaded" in str(exc) else f"NVML: {exc}"
        return Inventory((), error=reason)
    try:
        driver = _s(nvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(Gpu(index=i, uuid=_s(nvml.nvmlDeviceGetUUID(h)), name=_s(nvml.nvmlDeviceGetName(h)),
                            memory_total=int(mem.total), memory_used=int(mem.used), memory_free=int(mem.free)))
        return Inventory(tuple(gpus), driver=driver)
    finally:
        nvml.nvmlShutdown()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
