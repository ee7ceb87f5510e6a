"""The keeper: a small parent that holds one worker process for the node.

Why a keeper: the node must never leave an orphaned worker (even when it is
SIGKILLed), yet a node restart for an upgrade must be able to adopt running workers
instead of reloading models for minutes. The keeper runs in its own session, starts
the worker in another (with PR_SET_PDEATHSIG, so the worker dies with its keeper),
copies the worker's output into a rotated log, and watches its owner node. When the
owner disappears it waits `--grace` seconds for a successor to claim it through the
owner file; if none does, it stops the worker and exits. SIGTERM to the keeper stops
the worker (SIGTERM to its process group, SIGKILL after `--stop-timeout`).

Stdlib only: it starts quickly and survives node upgrades.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
POLL_S = 0.25


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a pid (guards against pid reuse), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rpartition(")")[2].split()
    if fields and fields[0] == "Z":  # a zombie is gone for our purposes
        return None
    return int(fields[19])


def owner_token(pid: int | None = None) -> str:
    """'PID STARTTIME' for a process (default: this one)."""
    pid = pid or os.getpid()
    return f"{pid} {process_start_time(pid)}"


def token_alive(token: str) -> bool:
    try:
        pid_s, start_s = token.split()
        return str(process_start_time(int(pid_s))) == start_s
    except ValueError:
        return False


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _in_worker(nice: int) -> None:
    """Run in the worker before it execs (its new session made): die with the keeper, and yield
    the CPU to the node.

    A runtime that never stops using the CPU (vLLM's CPU build polls) otherwise makes every
    wake-up of the node wait its turn: streams then arrive in one piece. The session's
    autogroup nice covers kernels that share CPU time by session; the process nice (which
    its children inherit) covers those that share it by cgroup. Raising either needs no
    privilege.
    """
    _set_pdeathsig()
    if nice > 0:
        os.nice(nice)
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
        except OSError:  # no autogroup (kernel option off, or not Linux's /proc): the process nice stands
            pass


def _copy_output(stream, log: logging.Logger) -> None:
    for raw in iter(stream.readline, b""):
        log.info(raw.rstrip(b"\n").decode("utf-8", "replace"))


def _make_log(path: Path, max_bytes: int, backups: int) -> logging.Logger:
    log = logging.getLogger("worker")
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def _stop_group(proc: subprocess.Popen, timeout: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also takes the worker's own children
    except ProcessLookupError:
        pass
    proc.wait()


def run(args: argparse.Namespace) -> int:
    state_path = Path(args.state)
    owner_path = Path(args.owner_file)
    log = _make_log(Path(args.log), args.log_max_bytes, args.log_backups)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    log.info(f"[keeper] starting: {' '.join(args.cmd)}")
    proc = subprocess.Popen(
        args.cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: _in_worker(args.nice),
    )
    threading.Thread(target=_copy_output, args=(proc.stdout, log), daemon=True).start()
    info = json.loads(args.info) if args.info else {}
    info.update(keeper=owner_token(), keeper_pid=os.getpid(), worker_pid=proc.pid, started_at=time.time())
    write_json_atomic(state_path, info)

    owner = args.owner
    orphan_since: float | None = None
    reason = ""
    while proc.poll() is None:
        if stop.wait(POLL_S):
            reason = "stopped by the node"
            _stop_group(proc, args.stop_timeout)
            break
        if token_alive(owner):
            orphan_since = None
            continue
        try:
            claimed = owner_path.read_text().strip()
        except FileNotFoundError:
            claimed = ""
        if claimed and claimed != owner and token_alive(claimed):
            log.info(f"[keeper] adopted by node {claimed.split()[0]}")
            owner, orphan_since = claimed, None
            continue
        orphan_since = orphan_since or time.monotonic()
        if time.monotonic() - orphan_since > args.grace:
            reason = f"owner node gone for {args.grace:.0f}s and nobody adopted the worker"
            log.info(f"[keeper] {reason}; stopping the worker")
            _stop_group(proc, args.stop_timeout)
            break
    code = proc.returncode
    # The worker's group may hold children that outlived it (e.g. vLLM's EngineCore).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.info(f"[keeper] worker exited with {code}" + (f" ({reason})" if reason else ""))
    info.update(exited=True, exit_code=code, exit_reason=reason, exited_at=time.time())
    write_json_atomic(state_path, info)
    return 0 if code is None or code < 0 else min(code, 255)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.keeper")
    p.add_argument("--state", required=True)
    p.add_argument("--owner", required=True, help="'PID STARTTIME' of the node that started it")
    p.add_argument("--owner-file", required=True)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=15.0)
    p.add_argument("--log", required=True)
    p.add_argument("--log-max-bytes", type=int, default=20 * 1024 * 1024)
    p.add_argument("--log-backups", type=int, default=3)
    p.add_argument("--info", default="")
    p.add_argument("--nice", type=int, default=0, help="the worker's CPU niceness (0: as the keeper's)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("no worker command after --")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
