"""What every `appliance.toml` section shares: strict keys, frozen values, memory sizes."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

GiB = 1024 ** 3
_UNITS = {"": None, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2,
          "gi": GiB, "gib": GiB, "ti": 1024 ** 4, "tib": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in "20GiB", "20 GB", "512MiB" (GiB/MiB are powers of 2, GB/MB of 10)."""
    m = _SIZE_RE.match(text)
    unit = _UNITS.get(m.group(2).lower(), None) if m else None
    if m is None or unit is None:
        raise ValueError(f"'{text}' is not a memory size; write e.g. \"20GiB\" or \"512MiB\"")
    return int(float(m.group(1)) * unit)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
