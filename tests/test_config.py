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
    ({"quotas": {"default": {"rpm": -1}}}, "quotas.default.rpm", "greater than or equal to 0"),
    ({"database": {"url": "mysql://x"}}, "database.url", "postgresql://"),
])
def test_bad_config_names_file_key_and_problem(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, P)
    line = e.value.message
    assert line.startswith(f"{P}: {key}: ")
    assert words in line
    assert "\n" not in line


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "appliance.toml").write_text('[node]\ndata_dir = "state"\n[runtimes.vllm]\npython = "envs/vllm/bin/python"\n')
    cfg = load_config(tmp_path / "appliance.toml")
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.runtimes["vllm"].python == tmp_path / "envs/vllm/bin/python"
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
