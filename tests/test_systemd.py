"""The systemd unit (checked by systemd-analyze) and the node's sd_notify messages."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from node.config import NodeSection, SupervisorSection
from node.ops.sdnotify import Notifier
from tests.conftest import REPO, TINY_MODEL, descendants_of_keepers, start_node, wait_until, write_config

INSTALL = REPO / "installer" / "install.sh"
UNIT = REPO / "systemd" / "infernode.service"


def parse_unit(text: str) -> dict[str, list[str]]:
    """Directives of a unit file as 'Section.Key' -> values (keys like DeviceAllow repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def render(prefix: Path, *extra: str) -> str:
    p = subprocess.run(["bash", str(INSTALL), "--print-unit", "--prefix", str(prefix), *extra],
                       capture_output=True, text=True, timeout=30, check=True)
    return p.stdout


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].isdigit():
            return int(value[: -len(suffix)]) * factor
    return float(value)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd; .ci/run installs it)")
    text = render(tmp_path)
    # verify checks that ExecStart exists and is executable: give it the installed layout.
    exe = tmp_path / "opt/infernode/current/bin/infernode"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "infernode.service"
    unit.write_text(text)
    p = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
    # ...and it does fail on a broken unit, so the check above means something.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(str(exe), str(tmp_path / "missing/infernode")))
    p = subprocess.run([analyze, "verify", "--man=no", str(broken)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "missing/infernode" in p.stderr


def test_unit_matches_how_the_node_stops_and_adopts() -> None:
    u = parse_unit(UNIT.read_text())
    s = lambda key: u[f"Service.{key}"][-1]  # noqa: E731
    assert s("Type") == "notify" and s("NotifyAccess") == "main"
    assert s("ExecStart") == "/opt/infernode/current/bin/infernode up"
    assert s("Restart") == "on-failure"
    # process: a SIGUSR2 exit leaves the keepers (and their workers) for the next node to adopt;
    # SIGTERM on stop goes to the node only, which stops the workers itself.
    assert s("KillMode") == "process" and s("KillSignal") == "SIGTERM"
    assert seconds(s("WatchdogSec")) >= 10
    # systemd must wait for a full drain plus the workers' stop before it SIGKILLs the node.
    assert seconds(s("TimeoutStopSec")) > NodeSection().drain_grace_s + SupervisorSection().stop_timeout_s
    assert s("NoNewPrivileges") == "yes" and s("ProtectSystem") == "strict" and s("PrivateTmp") == "yes"
    assert "/var/lib/infernode" in s("ReadWritePaths").split()
    assert s("DevicePolicy") == "closed"
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(u["Service.DeviceAllow"])
    assert int(s("LimitNOFILE")) >= 65536
    assert s("User") == "infernode" and s("Environment").startswith(("INFERNODE_CONFIG=", "PYTHONUNBUFFERED="))
    assert "INFERNODE_CONFIG=/etc/infernode/appliance.toml" in u["Service.Environment"]
    assert u["Install.WantedBy"] == ["multi-user.target"]


def test_rendered_unit_follows_prefix_and_user_mode(tmp_path: Path) -> None:
    system = parse_unit(render(tmp_path))
    assert system["Service.ExecStart"] == [f"{tmp_path}/opt/infernode/current/bin/infernode up"]
    assert system["Service.ReadWritePaths"] == [f"{tmp_path}/var/lib/infernode"]
    assert f"INFERNODE_CONFIG={tmp_path}/etc/infernode/appliance.toml" in system["Service.Environment"]
    user = parse_unit(render(tmp_path, "--user"))
    assert "Service.User" not in user and "Service.DeviceAllow" not in user
    assert user["Install.WantedBy"] == ["default.target"] and user["Service.Type"] == ["notify"]


class NotifyListener:
    """The systemd side of sd_notify: a unix datagram socket collecting messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            hit = next((m for m in self.messages if key in m), None)
            if hit:
                return hit
        raise AssertionError(f"no {key} in {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def test_node_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    cfg = write_config(tmp_path, TINY_MODEL)
    node = start_node(cfg, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    try:
        ready = listener.wait_for("READY")
        # READY means the API listens: /healthz answers at once, with no retry.
        assert httpx.get(node.url + "/healthz", timeout=5).status_code == 200
        assert ready["READY"] == "1" and ready["STATUS"] == f"listening on http://{node.url.removeprefix('http://')}"
        assert ready["MAINPID"] == str(node.proc.pid)
        first = len(listener.messages)
        time.sleep(2.2)
        listener.poll()
        pings = [m for m in listener.messages[first:] if m.get("WATCHDOG") == "1"]
        assert 3 <= len(pings) <= 6, listener.messages  # every WATCHDOG_USEC/2 = 0.5 s
        node.wait_ready()
        # `systemctl status` follows readiness: STATUS= changes once the model is served.
        deadline = time.monotonic() + 15
        while not any(m.get("STATUS", "").endswith("; ready, serving tiny-chat") for m in listener.messages):
            assert time.monotonic() < deadline, listener.messages
            listener.poll()
        # Workers must not inherit the socket: only the node speaks for the unit.
        workers = descendants_of_keepers(node.data_dir)
        assert workers
        for pid in workers:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC=")) for e in env), pid
        node.proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING", timeout=30)
        assert stopping["STATUS"] == "draining and stopping workers"
        assert node.proc.wait(30) == 0
        listener.poll()
        after = listener.messages[listener.messages.index(stopping) + 1:]
        assert not any("STATUS" in m for m in after), after  # the shutdown's status is not overwritten
        assert wait_until(lambda: not descendants_of_keepers(node.data_dir), timeout=20)
    finally:
        node.stop()
        listener.close()


def test_notifier_speaks_to_abstract_sockets_and_respects_watchdog_pid() -> None:
    name = f"@infernode-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifyListener(name)
    try:
        env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        n = Notifier.from_environ(env)
        assert env == {}  # unset, so that children do not inherit them
        assert n.watchdog_interval_s == 2.0
        assert n.status("loading") and n.watchdog()
        listener.poll()
        assert listener.messages == [{"STATUS": "loading"}, {"WATCHDOG": "1"}]
        other = Notifier.from_environ({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
        assert other.watchdog_interval_s is None  # that watchdog is meant for pid 1
    finally:
        listener.close()
    off = Notifier.from_environ({})
    assert not off.enabled and off.ready("x") is False and off.watchdog_interval_s is None
    gone = Notifier(name)  # nobody listens any more: a warning, never an exception
    assert gone.send(STATUS="x") is False
