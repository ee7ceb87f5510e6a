"""A worker's log file as the node reads it: its last lines, and why the worker exited."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_ERROR_LINE = re.compile(r"Error\b|(?i:\berror\b)|\bfatal\b")


def tail_lines(path: Path, n: int = 20, max_bytes: int = 16384) -> list[str]:
    """The last n lines of a log file (cheaply, from its end)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return [ln for ln in lines if not ln.startswith("[keeper]")][-n:]


def exit_summary(state_file: Path, log_path: Path, keeper_code: int | None) -> str:
    """Why a worker exited: its exit code (from the keeper's state file, else the keeper's own) and the log line naming the error."""
    try:
        info = json.loads(state_file.read_text())
    except (FileNotFoundError, ValueError):
        info = {}
    code = info.get("exit_code")
    if code is None:
        code = keeper_code
    what = f"worker exited with code {code}" if code is not None and code >= 0 else (
        f"worker killed by signal {-code}" if code is not None else "worker exited")
    last = tail_lines(log_path, 8)
    # The line that names the error, when a traceback's footer follows it (pydantic's "For further
    # information visit ..."); else the last line.
    named = [ln for ln in last if _ERROR_LINE.search(ln)]
    line = (named or last or [""])[-1].strip()
    return what + (f": {line}" if line else "")
