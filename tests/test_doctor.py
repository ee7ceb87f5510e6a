"""`infernode doctor` against a good setup, a broken one, and a running node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from node.accounts.storage import open_storage
from node.config import load_config
from node.ops.doctor import Level, check_database, check_fleet, check_gpus, check_store, run_checks
from node.supply.lockfile import read_lock
from node.supply.store import Store
from node.workers.gpus import discover
from tests.conftest import TINY_MODEL, free_port, llama_server, run_cli, wait_until, write_config
from tests.fakes.nvml import FakeNvml, box


def doctor(config: Path, env: dict | None = None) -> tuple[int, dict[str, dict], str]:
    p = run_cli("doctor", "--json", config=config, env=env)
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    text = run_cli("doctor", config=config, env=env)
    assert text.returncode == p.returncode
    return p.returncode, checks, text.stdout


def test_good_setup_passes(tmp_path: Path):
    llama_server()
    cfg = write_config(tmp_path, TINY_MODEL)
    run_cli("lock", config=cfg, check=True)
    run_cli("pull", config=cfg, check=True)
    storage = open_storage(load_config(cfg).database_url())
    storage.migrate()
    storage.close()
    rc, checks, text = doctor(cfg, env={"INFERNODE_ADMIN_KEY": "sk-admin-test-123456-0123456789abcdef"})
    assert rc == 0, text
    assert {c["level"] for c in checks.values()} <= {"ok", "warn"}
    assert checks["runtime llamacpp"]["level"] == "ok" and checks["runtime llamacpp"]["detail"].startswith("installed, version 0.")
    assert checks["model tiny-chat"]["level"] == "ok" and "all in the store" in checks["model tiny-chat"]["detail"]
    assert checks["database"]["level"] == "ok" and checks["admin key"]["level"] == "ok"
    assert checks["port"]["level"] == "ok" and "free" in checks["port"]["detail"]
    assert checks["driver"]["level"] == "warn"  # this box has no NVIDIA driver; CPU models only
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert all(ln.split()[0] in ("ok", "warn") for ln in lines[:-1]), text   # one line per check
    assert lines[-1].startswith(f"{len(checks)} checks: 0 failed")
    assert "sk-admin-test-123456-0123456789abcdef" not in text


def test_broken_setup_fails_and_says_what_to_fix(tmp_path: Path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    dead = free_port()
    models = TINY_MODEL + """
[runtimes.llamacpp]
server = "/nonexistent/bin/llama-server"
"""
    extra = f"""
[database]
url = "postgresql://postgres@127.0.0.1:{dead}/nowhere"

[fleet.litellm]
url = "http://127.0.0.1:{dead}"
advertise_url = "http://box:8080"
"""
    cfg = write_config(tmp_path, models, port=port, extra=extra)
    try:
        rc, checks, text = doctor(cfg, env={"INFERNODE_ADMIN_KEY": ""})
    finally:
        squatter.close()
    assert rc == 1, text
    failed = {name for name, c in checks.items() if c["level"] == "fail"}
    assert failed == {"runtime llamacpp", "port", "model tiny-chat", "database", "fleet"}, text
    assert "server = /nonexistent/bin/llama-server: not found" in checks["runtime llamacpp"]["detail"]
    assert "another program" in checks["port"]["detail"] and str(port) in checks["port"]["fix"]
    assert "infernode lock" in checks["model tiny-chat"]["detail"]
    assert "cannot reach" in checks["database"]["detail"] and "[database].url" in checks["database"]["fix"]
    assert "unreachable" in checks["fleet"]["detail"]
    assert checks["admin key"]["level"] == "warn"
    assert "→" in text and "fail runtime llamacpp" in " ".join(text.split())


def test_store_and_schema_problems(tmp_path: Path):
    cfg_path = write_config(tmp_path, TINY_MODEL)
    run_cli("lock", config=cfg_path, check=True)
    cfg = load_config(cfg_path)
    lock = read_lock(cfg.lock_path)
    [missing] = list(check_store(cfg, lock))
    assert missing.level is Level.WARN and "infernode pull" in missing.fix  # locked, not pulled yet
    run_cli("pull", config=cfg_path, check=True)
    [good] = list(check_store(cfg, lock, rehash=True))
    assert good.level is Level.OK and "digests verified" in good.detail
    blob = Store(cfg.data_dir / "store").blob_path(lock.models[0].files[0].sha256)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes: only a re-hash sees it
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    assert list(check_store(cfg, lock))[0].level is Level.OK
    [corrupt] = list(check_store(cfg, lock, rehash=True))
    assert corrupt.level is Level.FAIL and "digest mismatch" in corrupt.detail
    # The source changed in appliance.toml but not in models.lock: reported, never re-resolved.
    changed = cfg_path.read_text().replace('#*.gguf"', '#hf/*"')
    cfg_path.write_text(changed)
    [stale] = list(check_store(load_config(cfg_path), lock))
    assert stale.level is Level.FAIL and "run `infernode lock`" in stale.detail
    # A database written by a newer node.
    storage = open_storage(cfg.database_url())
    storage.migrate()
    storage.backend.execute("INSERT INTO schema_migrations (name, applied_at) VALUES ('999_from_the_future', 0)")
    storage.close()
    c = check_database(cfg)
    assert c.level is Level.FAIL and "999_from_the_future" in c.detail


def test_gpu_checks_with_and_without_a_driver(tmp_path: Path):
    gpu_model = TINY_MODEL.replace('runtime = "llamacpp"', 'runtime = "llamacpp"\ngpus = 1')
    cfg = load_config(write_config(tmp_path, gpu_model))
    c = check_gpus(cfg, discover(box(2)))
    assert c.level is Level.OK and "2 GPU(s)" in c.detail and "550.54.15" in c.detail
    from tests.fakes.nvml import NVMLError_LibraryNotFound
    c = check_gpus(cfg, discover(FakeNvml(init_error=NVMLError_LibraryNotFound)))
    assert c.level is Level.FAIL and "tiny-chat" in c.detail and "driver" in c.fix
    checks = run_checks(cfg, nvml=box(1))
    assert {c.name for c in checks} >= {"driver", "runtime llamacpp", "port", "disk", "database", "admin key", "fleet"}
    assert not any(c.name == "placement" and c.level is Level.FAIL for c in checks)


def test_running_node_is_recognised_on_its_port(tiny_node):
    rc, checks, text = doctor(tiny_node.config, env={"INFERNODE_ADMIN_KEY": tiny_node.admin_key})
    assert rc == 0, text
    assert checks["port"]["level"] == "ok" and "this node" in checks["port"]["detail"]
    assert checks["database"]["level"] == "ok" and checks["model tiny-chat"]["level"] == "ok"


LITELLM = Path(__file__).resolve().parent.parent / ".venv-litellm" / "bin" / "litellm"


@pytest.mark.skipif(not LITELLM.exists(), reason="no LiteLLM proxy: run `bash .ci/setup-litellm.sh` to create .venv-litellm")
def test_fleet_check_against_a_real_litellm_proxy(tmp_path: Path):
    port = free_port()
    (tmp_path / "litellm.yaml").write_text('model_list: []\ngeneral_settings:\n  master_key: "sk-proxy-master"\n')
    log = (tmp_path / "litellm.log").open("wb")
    proxy = subprocess.Popen([str(LITELLM), "--config", str(tmp_path / "litellm.yaml"), "--port", str(port), "--host", "127.0.0.1"],
                             stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    try:
        extra = f'[fleet.litellm]\nurl = "http://127.0.0.1:{port}"\nadvertise_url = "http://box:8080"\nmaster_key_env = "TEST_LITELLM_KEY"\n'
        cfg = load_config(write_config(tmp_path, TINY_MODEL, extra=extra))
        up = wait_until(lambda: proxy.poll() is not None or check_fleet(cfg, 2).level is not Level.FAIL
                        or "unreachable" not in check_fleet(cfg, 2).detail, timeout=180, interval=1)
        assert up and proxy.poll() is None, (tmp_path / "litellm.log").read_text()[-3000:]
        os.environ.pop("TEST_LITELLM_KEY", None)
        c = check_fleet(cfg, 10)
        assert c.level is Level.FAIL and "no master key" in c.detail
        os.environ["TEST_LITELLM_KEY"] = "sk-wrong"
        c = check_fleet(cfg, 10)
        assert c.level is Level.FAIL and "rejects the master key" in c.detail
        os.environ["TEST_LITELLM_KEY"] = "sk-proxy-master"
        c = check_fleet(cfg, 10)
        assert c.level is Level.OK and "accepts the master key" in c.detail
    finally:
        os.environ.pop("TEST_LITELLM_KEY", None)
        proxy.terminate()
        try:
            proxy.wait(20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


def test_ledger_check_reports_a_spill_file_left_behind(tmp_path: Path):
    cfg = write_config(tmp_path, "")
    rc, checks, text = doctor(cfg, env={"INFERNODE_ADMIN_KEY": "sk-admin-test-123456-0123456789abcdef"})
    assert checks["ledger"]["level"] == "ok" and "no usage rows" in checks["ledger"]["detail"]
    spill = load_config(cfg).data_dir / "ledger.spill"
    spill.parent.mkdir(parents=True, exist_ok=True)
    spill.write_text('{"request_id": "a"}\n{"request_id": "b"}\n{"request_id": "c"}\n')
    rc, checks, text = doctor(cfg, env={"INFERNODE_ADMIN_KEY": "sk-admin-test-123456-0123456789abcdef"})
    assert checks["ledger"]["level"] == "warn" and "3 usage rows" in checks["ledger"]["detail"]
    assert "ledger" in text and "next start" in text


def test_a_short_bootstrap_admin_key_is_refused_by_up_and_named_by_doctor(tmp_path: Path):
    cfg = write_config(tmp_path, "")
    rc, checks, text = doctor(cfg, env={"INFERNODE_ADMIN_KEY": "hunter2"})
    assert checks["admin key"]["level"] == "fail" and "7 characters" in checks["admin key"]["detail"]
    assert "openssl rand" in text and "hunter2" not in text
    p = run_cli("up", config=cfg, env={"INFERNODE_ADMIN_KEY": "hunter2"}, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "$INFERNODE_ADMIN_KEY" in lines[0] and "at least 32" in lines[0], p.stderr
    assert "hunter2" not in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "short.key").write_text("sk-admin-short\n")       # from a file: the file is named
    cfg.write_text(cfg.read_text().replace("drain_grace_s = 5\n", 'drain_grace_s = 5\nadmin_key_file = "short.key"\n'))
    p = run_cli("up", config=cfg, env={"INFERNODE_ADMIN_KEY": ""}, timeout=60)
    assert p.returncode == 2 and "short.key" in p.stderr and "Traceback" not in p.stderr, p.stderr
