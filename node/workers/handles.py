"""Handles on keeper processes: ones this node started, and ones an earlier node left."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from node.workers.keeper import process_start_time, token_alive


@dataclass
class Adoptable:
    """A keeper left running by an earlier node, found through its state file."""

    id: str
    keeper_pid: int
    port: int
    spec_hash: str
    state_file: Path
    gpu_uuids: tuple[str, ...] = ()
    gpu_memory_fraction: float | None = None
    need_bytes: int = 0


class KeeperHandle:
    """A running keeper: started by us (a child we reap) or adopted (watched by pidfd)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)

    async def wait(self) -> None:
        """Return once the keeper has exited (reaping it when it is our child)."""
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            fut: asyncio.Future[None] = loop.create_future()
            def exited() -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self._pidfd, exited)
            try:
                await fut
            finally:
                loop.remove_reader(self._pidfd)
        else:  # no pidfd: poll
            while self.alive():
                await asyncio.sleep(0.2)
        if self.popen is not None:
            self.popen.wait()

    def alive(self) -> bool:
        """Whether the keeper still runs."""
        if self.popen is not None:
            return self.popen.poll() is None
        return process_start_time(self.pid) is not None

    def signal(self, sig: int) -> None:
        """Send a signal, ignoring a keeper that is already gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def close(self) -> None:
        """Release the pidfd (the process is not touched)."""
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def session_pids(leaders: set[int]) -> set[int]:
    """Every live process in the sessions these workers lead (a worker runs in a session of
    its own, so this is the worker and every child it made, e.g. vLLM's engine processes)."""
    if not leaders:
        return set()
    found = set(leaders)
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 3 and int(fields[3]) in leaders:
            found.add(int(p.name))
    return found


def find_adoptable(run_dir: Path) -> dict[str, Adoptable]:
    """Keepers left by an earlier node that are still alive, by replica id."""
    found: dict[str, Adoptable] = {}
    for path in sorted(run_dir.glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        token = info.get("keeper", "")
        if info.get("exited") or not token_alive(token):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        found[info["id"]] = Adoptable(
            id=info["id"], keeper_pid=info["keeper_pid"], port=info["port"],
            spec_hash=info["spec_hash"], state_file=path, gpu_uuids=tuple(info.get("gpus") or ()),
            gpu_memory_fraction=info.get("fraction"), need_bytes=int(info.get("need_bytes") or 0),
        )
    return found


def claim_workers(run_dir: Path, token: str) -> None:
    """Tell every keeper an earlier node left that `token`'s node owns it now (before its grace runs out)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = run_dir / "owner"
    tmp = owner.with_name(".owner.tmp")
    tmp.write_text(token)
    tmp.replace(owner)
