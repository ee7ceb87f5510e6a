"""The `infernode` command itself: what it loads, and how it answers bad usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import INFERNODE, REPO, free_port, write_config

# What only the server needs: loading any of these makes every CLI call slow.
SERVER_ONLY = ("fastapi", "node.app", "node.server", "node.gateway", "node.workers.supervisor")

LOADED = """
import json, sys
sys.argv = ["infernode", *json.loads(sys.argv[1])]
from node.cli import main
try:
    main()
except SystemExit:
    pass
open({out!r}, "w").write(json.dumps(sorted(sys.modules)))
"""


def modules_loaded(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules in sys.modules after the CLI ran with these arguments, in a fresh interpreter."""
    out = tmp_path / "modules.json"
    code = LOADED.format(out=str(out))
    p = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=REPO, timeout=60)
    assert out.exists(), p.stderr
    return set(json.loads(out.read_text()))


def server_only(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == s or m.startswith(s + ".") for s in SERVER_ONLY))


def test_help_loads_nothing_of_the_server(tmp_path: Path) -> None:
    modules = modules_loaded(tmp_path, "--help")
    assert "node.cli.keys" in modules  # the commands are there, so the check below means something
    assert server_only(modules) == []


def test_keys_list_loads_nothing_of_the_server(tmp_path: Path) -> None:
    """`keys list` against a node that is not running: the whole client path, up to the connection."""
    cfg = write_config(tmp_path, "", port=free_port())
    modules = modules_loaded(tmp_path, "keys", "list", "--config", str(cfg), env={"INFERNODE_ADMIN_KEY": "sk-admin-x"})
    assert "node.admin.client" in modules and "httpx" in modules
    assert server_only(modules) == []


@pytest.mark.parametrize(("args", "says"), [
    (["nosuchcmd"], "No such command"),
    (["keys", "create", "--bogus"], "--bogus"),
    (["keys", "nosuchcmd"], "No such command"),
    (["pull", "--from"], "requires an argument"),
    (["keys", "create", "--rpm", "many"], "Invalid value for '--rpm'"),
])
def test_bad_usage_is_a_usage_error_exit_2(args: list[str], says: str) -> None:
    p = subprocess.run(INFERNODE + args, capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})  # rich wraps the message at the terminal's width
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    assert says in p.stderr


def test_node_errors_are_one_line_exit_1_or_2(tmp_path: Path) -> None:
    missing = subprocess.run(INFERNODE + ["keys", "list", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    cfg = write_config(tmp_path, "", port=free_port())
    down = subprocess.run(INFERNODE + ["keys", "list", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "INFERNODE_ADMIN_KEY": "sk-admin-x"}, timeout=60)
    assert down.returncode == 1 and "no node is answering" in down.stderr and "Traceback" not in down.stderr


def test_help_exits_0() -> None:
    p = subprocess.run(INFERNODE + ["--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and "keys" in p.stdout and "Traceback" not in p.stderr
