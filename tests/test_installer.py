"""installer/install.sh and uninstall.sh, for real: venvs, pip, a started node, upgrade, removal.

One install -> reinstall -> upgrade -> uninstall sequence into a temporary prefix, as the
tests below in file order (each builds on the one before; pip's cache keeps it to minutes).
They use `--user` semantics (no `infernode` system user, files owned by the caller) and
`--no-systemd`, so running them as root changes nothing outside the temporary prefix.
The source installed is `git archive HEAD` of this checkout (its working tree may be
mid-edit); without git they install the working tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port, wait_until

INSTALL = REPO / "installer" / "install.sh"
UNINSTALL = REPO / "installer" / "uninstall.sh"


class Box:
    """A temporary machine root that the installer installs into."""

    def __init__(self, root: Path, source: Path, port: int) -> None:
        self.root = root
        self.prefix = root / "prefix"
        self.source = source
        self.port = port
        self.opt = self.prefix / "opt/infernode"
        self.etc = self.prefix / "etc/infernode"
        self.data = self.prefix / "var/lib/infernode"
        self.cli = self.prefix / "bin/infernode"
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = ""

    def install(self, *extra: str, timeout: float = 480) -> subprocess.CompletedProcess:
        argv = ["bash", str(INSTALL), "--user", "--prefix", str(self.prefix), "--no-systemd",
                "--python", sys.executable, "--source", str(self.source), "--listen", f"127.0.0.1:{self.port}",
                # pip's cache does the heavy lifting; skipping .pyc compilation saves CPU on shared CI boxes.
                "--pip-arg=--no-compile", *extra]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{argv} -> {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}"
        return p

    def uninstall(self, *extra: str) -> subprocess.CompletedProcess:
        argv = ["bash", str(UNINSTALL), "--user", "--prefix", str(self.prefix), "--no-systemd", *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def current(self) -> str:
        return os.readlink(self.opt / "current")

    def start(self, log_name: str) -> subprocess.Popen:
        """`infernode up` from the installed venv, configured the way the systemd unit does it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERNODE_", "VIRTUAL_ENV"))}
        env["INFERNODE_CONFIG"] = str(self.etc / "appliance.toml")
        log = (self.root / log_name).open("wb")
        return subprocess.Popen([str(self.opt / "current/bin/infernode"), "up"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=self.data)

    def wait_ready(self, proc: subprocess.Popen, log_name: str, timeout: float = 120) -> None:
        def ready() -> bool:
            assert proc.poll() is None, (self.root / log_name).read_text()[-4000:]
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(ready, timeout=timeout, interval=0.3), (self.root / log_name).read_text()[-4000:]

    def admin(self) -> httpx.Client:
        key = (self.etc / "admin.key").read_text().strip()
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def files_under(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def worker_pids(box: Box) -> list[int]:
    """The llama-server workers running from this install's own copy of it."""
    needle = f"{box.opt}/runtimes/llamacpp/bin/llama-server"
    # The keeper's command line names the worker's too: the worker is the one it starts with.
    return sorted(pid for pid, cmd in processes(needle) if cmd.startswith(needle + " "))


def processes_mentioning(needle: str) -> list[str]:
    return [cmd for _, cmd in processes(needle)]


def processes(needle: str) -> list[tuple[int, str]]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                out.append((int(p.name), cmd))
    return out


def source_tree(root: Path) -> Path:
    """The committed source, as a release would ship it (else the checkout itself)."""
    source = root / "src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, timeout=60)
    if archive.returncode != 0:
        return REPO
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True, timeout=60)
    return source


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    root = tmp_path_factory.mktemp("installbox")
    yield Box(root, source_tree(root), free_port())
    for cmd in processes_mentioning(str(root)):  # nothing may outlive the module
        raise AssertionError(f"left running: {cmd}")


@pytest.mark.timeout(900)
def test_install_then_the_installed_node_answers_readyz(box: Box) -> None:
    t0 = time.monotonic()
    p = box.install("--runtime", "llamacpp")
    print(f"install took {time.monotonic() - t0:.0f}s")
    assert "Next steps:" in p.stdout and "no NVIDIA driver found" in p.stderr  # warns, does not fail
    assert (box.opt / "current/bin/infernode").exists() and box.current().startswith("venvs/node-")
    server = box.opt / "runtimes/llamacpp/bin/llama-server"
    assert os.access(server, os.X_OK) and "version:" in subprocess.run([server, "--version"], capture_output=True,
                                                                       text=True, timeout=30).stderr
    cfg = (box.etc / "appliance.toml").read_text()
    assert f'data_dir = "{box.data}"' in cfg and f'listen = "127.0.0.1:{box.port}"' in cfg
    assert f'admin_key_file = "{box.etc}/admin.key"' in cfg
    assert f'[runtimes.llamacpp]\nserver = "{server}"' in cfg
    assert (box.etc / "models.lock").read_text().count("[[models]]") == 1
    key = box.etc / "admin.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.read_text().startswith("sk-admin-")
    # The node's venv has the node, not a Python llama.cpp: the runtime is llama-server alone.
    assert subprocess.run([str(box.opt / "current/bin/python"), "-c", "import llama_cpp"], capture_output=True).returncode != 0
    # The CLI on PATH finds this install's config by itself.
    p = subprocess.run([str(box.cli), "lock", "--check"], capture_output=True, text=True, cwd=box.root, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "INFERNODE_CONFIG"})
    assert p.returncode == 0, p.stderr

    node = box.start("node1.log")
    try:
        box.wait_ready(node, "node1.log")
        assert worker_pids(box)
        with box.admin() as admin:  # the admin key the installer generated is the one the node uses
            r = admin.post("/admin/v1/keys", json={"name": "survives-upgrade"})
            assert r.status_code in (200, 201), r.text
            box.api_key = r.json()["key"]
        r = httpx.get(box.url + "/v1/models", headers={"authorization": f"Bearer {box.api_key}"}, timeout=10)
        assert [m["id"] for m in r.json()["data"]] == ["tiny-chat"]
        # uninstall refuses while a node runs on the data.
        u = box.uninstall()
        assert u.returncode == 1 and "still running" in u.stderr and (box.opt / "current").exists()
    finally:
        assert stop(node) == 0
    assert wait_until(lambda: not processes_mentioning(str(box.data)), timeout=30)


@pytest.mark.timeout(300)
def test_reinstall_is_idempotent(box: Box) -> None:
    before = files_under(box.etc), box.current(), sorted(os.listdir(box.opt / "venvs"))
    t0 = time.monotonic()
    p = box.install("--runtime", "llamacpp")
    took = time.monotonic() - t0
    print(f"reinstall took {took:.1f}s")
    assert "node already installed" in p.stdout and "runtime llamacpp: already installed" in p.stdout
    assert "keeping" in p.stdout
    assert (files_under(box.etc), box.current(), sorted(os.listdir(box.opt / "venvs"))) == before
    assert took < 60, f"a no-op reinstall took {took:.0f}s"


@pytest.mark.timeout(900)
def test_upgrade_swaps_the_venv_keeps_config_and_data_and_the_workers(box: Box) -> None:
    cfg = box.etc / "appliance.toml"
    cfg.write_text(cfg.read_text().replace('name = "', 'name = "edited-', 1))  # a user's edit
    etc_before = files_under(box.etc)
    old = box.current()
    runtime_before = files_under(box.opt / "runtimes/llamacpp/bin")
    node = box.start("node2.log")  # the old node serves while the upgrade runs
    new_node = None
    try:
        box.wait_ready(node, "node2.log")
        workers = worker_pids(box)
        assert len(workers) == 1
        # --runtime none: upgrade the node only (a runtime named with --upgrade is pip-upgraded in place).
        t0 = time.monotonic()
        p = box.install("--runtime", "none", "--upgrade")
        print(f"upgrade took {time.monotonic() - t0:.0f}s")
        new = box.current()
        assert new != old and f"(was {old})" in p.stdout
        assert "still runs the old venv" in p.stderr and "SIGUSR2" in p.stderr
        assert sorted(os.listdir(box.opt / "venvs")) == sorted({old.split("/")[1], new.split("/")[1]})  # previous kept
        assert files_under(box.etc) == etc_before
        assert files_under(box.opt / "runtimes/llamacpp/bin") == runtime_before
        assert node.poll() is None and httpx.get(box.url + "/readyz", timeout=5).status_code == 200  # undisturbed

        # The restart the docs describe: SIGUSR2 leaves the workers; the new node adopts them.
        node.send_signal(signal.SIGUSR2)
        assert node.wait(60) == 0
        assert worker_pids(box) == workers
        new_node = box.start("node3.log")
        box.wait_ready(new_node, "node3.log", timeout=90)
        assert new.split("/")[1] in Path(f"/proc/{new_node.pid}/cmdline").read_text()
        assert worker_pids(box) == workers  # adopted: no model reload
        # The key created before the upgrade still works: the database was kept.
        r = httpx.get(box.url + "/v1/models", headers={"authorization": f"Bearer {box.api_key}"}, timeout=10)
        assert r.status_code == 200, r.text
        with box.admin() as admin:
            assert admin.get("/admin/v1/status").json()["node"]["name"].startswith("edited-")
    finally:
        stop(node)
        if new_node is not None:
            assert stop(new_node) == 0
    assert wait_until(lambda: not processes_mentioning(str(box.data)), timeout=30)


@pytest.mark.timeout(120)
def test_uninstall_leaves_nothing_but_data(box: Box) -> None:
    etc_before = files_under(box.etc)
    p = box.uninstall()
    assert p.returncode == 0, p.stderr
    left = files_under(box.prefix)
    assert left and all(path.startswith("var/lib/infernode/") for path in left), sorted(left)
    assert "var/lib/infernode/infernode.db" in left
    # The config and admin key are parked with the data, byte for byte.
    saved = {f"config-saved/{k}": v for k, v in etc_before.items()}
    assert saved.items() <= {k.removeprefix("var/lib/infernode/"): v for k, v in left.items()}.items()
    assert not any(p.is_symlink() for p in box.prefix.rglob("*") if "var/lib/infernode" not in str(p))
    assert sorted(x.name for x in box.prefix.iterdir()) == ["var"]
    p = box.uninstall("--purge")
    assert p.returncode == 0, p.stderr
    assert not box.prefix.exists() or not any(box.prefix.iterdir())


def test_installer_refuses_bad_input_with_one_clear_line(tmp_path: Path) -> None:
    base = ["bash", str(INSTALL), "--user", "--prefix", str(tmp_path / "p"), "--no-systemd"]
    p = subprocess.run(base + ["--runtime", "llamacpp,tgi"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "unknown runtime 'tgi'" in p.stderr
    p = subprocess.run(base + ["--source", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not an Infernode source tree" in p.stderr and "--source" in p.stderr
    p = subprocess.run(base + ["--python", shutil.which("true") or "/bin/true"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Python >= 3.11" in p.stderr
    p = subprocess.run(base + ["--frobnicate"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "unknown option '--frobnicate'" in p.stderr
    if os.geteuid() == 0 and shutil.which("runuser"):
        # Without --user it needs root (it creates a system user and writes /opt, /etc, /var/lib).
        # The script on stdin: `nobody` may not be able to read a checkout under a private directory.
        p = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s", "--", "--prefix", str(tmp_path / "p")],
                           input=INSTALL.read_text(), capture_output=True, text=True, timeout=60, cwd="/")
        assert p.returncode == 1 and "run as root" in p.stderr and "--user" in p.stderr
    assert not (tmp_path / "p").exists()  # nothing written on refusal
    p = subprocess.run(["bash", str(UNINSTALL), "--user", "--prefix", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert p.returncode == 1 and "no Infernode installed" in p.stderr


@pytest.mark.timeout(900)
def test_tls_selfsigned_install_serves_https(tmp_path: Path) -> None:
    box = Box(tmp_path, source_tree(tmp_path), free_port())
    p = box.install("--runtime", "none", "--tls-selfsigned")
    crt, key = box.etc / "tls/node.crt", box.etc / "tls/node.key"
    assert key.stat().st_mode & 0o777 == 0o600 and b"BEGIN CERTIFICATE" in crt.read_bytes()
    cfg = (box.etc / "appliance.toml").read_text()
    assert f'tls_cert = "{crt}"' in cfg and f'tls_key = "{key}"' in cfg
    assert f"--cacert {crt} https://127.0.0.1:{box.port}/readyz" in p.stdout
    again = box.install("--runtime", "none", "--tls-selfsigned")  # idempotent: the certificate is kept
    assert "TLS: keeping" in again.stdout
    node = box.start("tls.log")
    try:
        ctx = ssl.create_default_context(cafile=str(crt))

        def up() -> bool:
            assert node.poll() is None, (tmp_path / "tls.log").read_text()[-4000:]
            try:
                return httpx.get(f"https://127.0.0.1:{box.port}/healthz", verify=ctx, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(up, timeout=120, interval=0.3), (tmp_path / "tls.log").read_text()[-4000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{box.port}/healthz", timeout=3)  # plain HTTP is not served
        # The installed CLI talks TLS to its node, trusting the certificate the installer made.
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
        s = subprocess.run([str(box.cli), "status", "--json"], capture_output=True, text=True, env=env, timeout=60,
                           cwd=tmp_path)
        assert s.returncode == 0, s.stderr
    finally:
        assert stop(node) == 0
    assert box.uninstall("--purge").returncode == 0
