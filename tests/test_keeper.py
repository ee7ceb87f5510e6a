"""The keeper process for real: rotated worker logs, stopping the worker's group, and
waiting for (or giving up on) a successor node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from node.workers.keeper import owner_token, process_start_time, token_alive
from tests.conftest import wait_until

CHATTY = ("import sys, time\n"
          "for i in range(400): print(f'line {i:04d} ' + 'x' * 40, flush=True)\n"
          "print('done writing', flush=True)\n"
          "time.sleep(600)\n")


def keeper(tmp: Path, *cmd: str, owner: str | None = None, grace: float = 30, max_bytes: int = 1 << 20,
           backups: int = 3) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "node.workers.keeper", "--state", str(tmp / "w.json"), "--owner", owner or owner_token(),
         "--owner-file", str(tmp / "owner"), "--grace", str(grace), "--stop-timeout", "2",
         "--log", str(tmp / "w.log"), "--log-max-bytes", str(max_bytes), "--log-backups", str(backups),
         "--info", json.dumps({"id": "w"}), "--", *cmd],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def state(tmp: Path) -> dict:
    try:
        return json.loads((tmp / "w.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def log_lines(tmp: Path) -> list[str]:
    try:
        return (tmp / "w.log").read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    return process_start_time(pid) is not None


def test_worker_output_is_rotated(tmp_path):
    k = keeper(tmp_path, sys.executable, "-c", CHATTY, max_bytes=4000, backups=2)
    try:
        # A line of its own: the keeper's "[keeper] starting: ..." line quotes the command too.
        assert wait_until(lambda: "done writing" in (tmp_path / "w.log").read_text(errors="replace").splitlines()
                          if (tmp_path / "w.log").exists() else False, timeout=30)
        files = sorted(p.name for p in tmp_path.glob("w.log*"))
        assert files == ["w.log", "w.log.1", "w.log.2"]  # backups=2: older ones are deleted
        for p in tmp_path.glob("w.log*"):
            assert p.stat().st_size <= 4000
        # The newest lines are in w.log, the ones before them in w.log.1: nothing is lost between them.
        current = (tmp_path / "w.log").read_text().splitlines()
        previous = (tmp_path / "w.log.1").read_text().splitlines()
        first = int(current[0].split()[1])
        assert previous[-1].startswith(f"line {first - 1:04d}")
        assert current[-1] == "done writing"
    finally:
        k.send_signal(signal.SIGTERM)
        k.wait(15)


def test_sigterm_stops_the_whole_worker_group(tmp_path):
    # The worker starts a grandchild that ignores SIGTERM: the keeper must still take it down.
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"child up\", flush=True); time.sleep(600)'])\n"
            "print('grandchild', p.pid, flush=True)\n"
            "time.sleep(600)\n")
    k = keeper(tmp_path, sys.executable, "-c", code)
    # Whole lines only: the keeper's "[keeper] starting: ..." line quotes the command too.
    info = wait_until(lambda: state(tmp_path).get("worker_pid") and {"child up"} <= set(log_lines(tmp_path))
                      and any(ln.startswith("grandchild ") for ln in log_lines(tmp_path)) and state(tmp_path), timeout=20)
    worker = info["worker_pid"]
    grandchild = int(next(ln for ln in (tmp_path / "w.log").read_text().splitlines() if ln.startswith("grandchild")).split()[1])
    assert alive(worker) and alive(grandchild)
    k.send_signal(signal.SIGTERM)
    assert k.wait(20) == 0
    assert not alive(worker) and not alive(grandchild)
    final = state(tmp_path)
    assert final["exited"] is True and final["exit_reason"] == "stopped by the node"
    assert "[keeper] worker exited" in (tmp_path / "w.log").read_text()


def test_owner_gone_stops_worker_after_grace(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    token = owner_token(owner.pid)
    k = keeper(tmp_path, sys.executable, "-c", "import time; time.sleep(600)", owner=token, grace=1)
    worker = wait_until(lambda: state(tmp_path).get("worker_pid"), timeout=20)
    owner.kill()
    owner.wait()
    t0 = time.monotonic()
    assert k.wait(20) == 0
    assert time.monotonic() - t0 >= 0.9  # it waited for a successor first
    assert not alive(worker)
    assert "nobody adopted" in state(tmp_path)["exit_reason"]


def test_successor_claims_worker(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    k = keeper(tmp_path, sys.executable, "-c", "import time; time.sleep(600)", owner=owner_token(owner.pid), grace=2)
    try:
        worker = wait_until(lambda: state(tmp_path).get("worker_pid"), timeout=20)
        (tmp_path / "owner").write_text(owner_token())  # this test process plays the successor node
        owner.kill()
        owner.wait()
        assert wait_until(lambda: "adopted by node" in (tmp_path / "w.log").read_text(), timeout=10)
        time.sleep(3)  # longer than the grace: the claimed keeper stays
        assert k.poll() is None and alive(worker)
        assert token_alive(state(tmp_path)["keeper"])
    finally:
        k.send_signal(signal.SIGTERM)
        k.wait(15)
    assert not alive(worker)


def test_exit_code_recorded(tmp_path):
    k = keeper(tmp_path, sys.executable, "-c", "import sys; print('bye'); sys.exit(7)")
    assert k.wait(20) == 7
    assert state(tmp_path)["exit_code"] == 7
    assert os.path.exists(tmp_path / "w.log")


def test_the_worker_yields_the_cpu_to_the_node(tmp_path):
    """--nice: the worker (and its children) run at that niceness, and so does its session's autogroup."""
    def nice_of(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])

    k = subprocess.Popen(
        [sys.executable, "-m", "node.workers.keeper", "--state", str(tmp_path / "w.json"), "--owner", owner_token(),
         "--owner-file", str(tmp_path / "owner"), "--stop-timeout", "2", "--log", str(tmp_path / "w.log"),
         "--nice", "7", "--", sys.executable, "-c",
         "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
         "print('up', flush=True); time.sleep(600)"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = wait_until(lambda: state(tmp_path).get("worker_pid"), timeout=20)
        assert pid and wait_until(lambda: "up" in log_lines(tmp_path) or any(x.endswith(" up") for x in log_lines(tmp_path)))
        assert nice_of(pid) == 7 and nice_of(os.getpid()) == 0 and nice_of(k.pid) == 0
        child = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
        assert nice_of(child) == 7
        autogroup = Path(f"/proc/{pid}/autogroup")
        if autogroup.exists():   # kernels sharing CPU by session
            assert autogroup.read_text().split()[-1] == "7"
            # The keeper's own session (its own autogroup) keeps nice 0. Not pytest's: a process
            # left in init's session sits in the root group, whose autogroup file reads empty.
            assert Path(f"/proc/{k.pid}/autogroup").read_text().split()[-1] == "0"
    finally:
        k.send_signal(signal.SIGTERM)
        k.wait(20)
