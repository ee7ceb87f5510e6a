"""appliance.toml: validation with one clear line naming file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import load_config, parse_config
from node.errors import ConfigError
from tests.conftest import REPO, run_cli

P = Path("/etc/infernode/appliance.toml")
M = {"name": "m", "source": "file:x", "runtime": "llamacpp"}


@pytest.mark.parametrize("raw, key, words", [
    ({"node": {"nmae": "x"}}, "node.nmae", "unknown key"),
    ({"models": [{**M, "runtime": "vlm"}]}, "models[0].runtime", "unknown runtime 'vlm'; use one of"),
    ({"models": [{**M, "replicas": "two"}]}, "models[0].replicas", "valid integer"),
    ({"models": [M, M]}, "models[1].name", "duplicate model name 'm'"),
    ({"models": [{"name": "e", "runtime": "external"}]}, "models[0]", "needs url"),
    ({"models": [{"name": "m", "runtime": "vllm"}]}, "models[0]", "source is required"),
    ({"node": {"listen": "8080"}}, "node.listen", "HOST:PORT"),
    ({"runtimes": {"tgi": {}}}, "runtimes", "unknown runtime 'tgi'"),
    ({"runtimes": {"vllm": {"server": "/opt/x"}}}, "runtimes.vllm.server", "vllm has no server executable of its own"),
    ({"runtimes": {"llamacpp": {"python": "/opt/venv/bin/python"}}}, "runtimes.llamacpp.python",
     "llamacpp runs its own server executable, not a Python module; remove python (set server = PATH"),
    ({"quotas": {"default": {"rpm": -1}}}, "quotas.default.rpm", "greater than or equal to 0"),
    ({"database": {"url": "mysql://x"}}, "database.url", "postgresql://"),
    ({"node": {"batch_yield_s": -1}}, "node.batch_yield_s", "greater than or equal to 0"),
    ({"node": {"batch_yield_s": 3600}}, "node.batch_yield_s", "less than or equal to 60"),
    ({"node": {"batch_yield_s": "soon"}}, "node.batch_yield_s", "valid number"),
])
def test_bad_config_names_file_key_and_problem(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, P)
    line = e.value.message
    assert line.startswith(f"{P}: {key}: ")
    assert words in line
    assert "\n" not in line


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "appliance.toml").write_text('[node]\ndata_dir = "state"\n[runtimes.vllm]\npython = "envs/vllm/bin/python"\n'
                                             '[runtimes.llamacpp]\nserver = "bin/llama-server"\n')
    cfg = load_config(tmp_path / "appliance.toml")
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.runtimes["vllm"].python == tmp_path / "envs/vllm/bin/python"
    assert cfg.runtimes["llamacpp"].server == tmp_path / "bin/llama-server"
    (tmp_path / "appliance.toml").write_text('[runtimes.llamacpp]\nserver = "llama-server"\n')  # a bare name: looked up on PATH
    assert load_config(tmp_path / "appliance.toml").runtimes["llamacpp"].server == Path("llama-server")
    assert cfg.lock_path == tmp_path / "models.lock"
    assert cfg.database_url() == f"sqlite:///{tmp_path / 'state' / 'infernode.db'}"


def test_repo_default_config_is_valid():
    cfg = load_config(REPO / "appliance.toml")
    assert [m.name for m in cfg.models] == ["tiny-chat"]
    assert cfg.models[0].runtime == "llamacpp" and cfg.models[0].gpu_count == 0


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[[models]]\nname = "a"\nsource = "file:x"\nruntime = "tgi"\n')
    p = run_cli("lock", config=cfg)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert f"{cfg}: models[0].runtime: unknown runtime 'tgi'" in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_missing_and_broken_config(tmp_path):
    p = run_cli("lock", config=tmp_path / "nope.toml")
    assert p.returncode == 2 and "no such file" in p.stderr and "infernode init" in p.stderr
    bad = tmp_path / "appliance.toml"
    bad.write_text("[node\n")
    p = run_cli("lock", config=bad)
    assert p.returncode == 2 and "not valid TOML" in p.stderr


SECRETS = {  # section, its keys, and how each secret is read through the one helper
    "admin": lambda cfg: cfg.admin_key(),
    "fleet": lambda cfg: cfg.secret(cfg.fleet.litellm.master_key_env, cfg.fleet.litellm.master_key_file),
    "alerts": lambda cfg: cfg.secret(cfg.alerts.secret_env, cfg.alerts.secret_file),
}


def _secret_config(which: str) -> dict:
    return {
        "admin": {"node": {"admin_key_env": "TEST_SECRET_ENV", "admin_key_file": "keys/the.key"}},
        "fleet": {"fleet": {"litellm": {"url": "http://p:4000", "advertise_url": "http://n:8080",
                                        "master_key_env": "TEST_SECRET_ENV", "master_key_file": "keys/the.key"}}},
        "alerts": {"alerts": {"webhook_urls": ["http://h/x"], "secret_env": "TEST_SECRET_ENV",
                              "secret_file": "keys/the.key"}},
    }[which]


@pytest.mark.parametrize("which", sorted(SECRETS))
def test_secret_from_env_else_file_relative_to_the_config(tmp_path, monkeypatch, which):
    """Every secret follows one rule: its variable, else its file, a relative file under the config's folder."""
    etc = tmp_path / "etc"
    (etc / "keys").mkdir(parents=True)
    (etc / "keys" / "the.key").write_text("sk-from-file\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keys").mkdir(parents=True)
    (elsewhere / "keys" / "the.key").write_text("sk-wrong-folder\n")  # what a working-directory lookup would find
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("TEST_SECRET_ENV", raising=False)
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "data")}} | _secret_config(which), etc / "appliance.toml")
    read = SECRETS[which]
    assert read(cfg) == "sk-from-file"
    monkeypatch.setenv("TEST_SECRET_ENV", " sk-from-env\n")
    assert read(cfg) == "sk-from-env"
    monkeypatch.delenv("TEST_SECRET_ENV")
    (etc / "keys" / "the.key").write_text("\n")
    assert read(cfg) is None  # an empty file is no secret
    (etc / "keys" / "the.key").unlink()
    assert read(cfg) is None


def test_relative_alert_secret_file_signs_from_the_config_folder(tmp_path, monkeypatch):
    """The bug this guards: `[alerts] secret_file = "x"` was read from the working directory."""
    from node.ops.doctor import check_alerts

    (tmp_path / "alert.key").write_text("sk-alerts\n")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("INFERNODE_ALERT_SECRET", raising=False)
    raw = {"node": {"data_dir": "data"}, "alerts": {"webhook_urls": ["http://h/x"], "secret_file": "alert.key"}}
    check = check_alerts(parse_config(raw, tmp_path / "appliance.toml"))
    assert check.level.value == "ok" and "signed" in check.detail


@pytest.mark.parametrize("name, ok", [
    ("x/../../../../outside", False), ("a/b", False), ("..", False), ("a..b", False), ("/abs", False),
    ("a\\b", False), ("x" * 129, False), ("llama3:8b", True), ("qwen2.5-7b-instruct", True), ("tiny_chat", True),
])
def test_model_names_never_leave_the_store(name, ok):
    """A model name becomes a folder: no separator, no `..`; Ollama's NAME:TAG keeps working."""
    raw = {"models": [{**M, "name": name}]}
    if ok:
        assert parse_config(raw, P).models[0].name == name
        return
    with pytest.raises(ConfigError) as e:
        parse_config(raw, P)
    assert "models[0].name" in e.value.message and "\n" not in e.value.message


def test_a_hand_edited_lock_cannot_name_a_folder_outside_the_store(tmp_path):
    from node.supply.lockfile import read_lock
    lock = tmp_path / "models.lock"
    lock.write_text('version = 1\n[[models]]\nname = "x/../../../../outside"\nsource = "file:x"\nrevision = "r"\n'
                    'digest = ""\nfiles = []\n')
    with pytest.raises(ConfigError) as e:
        read_lock(lock)
    assert "name" in e.value.message
