"""Dockerfile.gpu, compose.yaml and .dockerignore, checked without a Docker engine.

No Docker engine runs on these machines, so the image is never built here. What can be
checked is: the Dockerfile parses with BuildKit's own parser (the `dockerfile` package
wraps moby/buildkit's Go parser), every file it copies exists in git and survives
.dockerignore, and its instructions follow the conventions the image promises.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO

dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (in the [test] extra)")

KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
         "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


@pytest.fixture(scope="module")
def commands() -> tuple:
    return dockerfile.parse_file(str(REPO / "Dockerfile.gpu"))


def one(commands: tuple, cmd: str):
    found = [c for c in commands if c.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd}, got {len(found)}"
    return found[0]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent folder) decides; `!` re-includes."""
    ignored = False
    parts = path.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")  # ** spans folders
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not neg
    return ignored


def test_dockerfile_parses_and_uses_known_instructions(commands: tuple) -> None:
    assert commands and all(c.cmd in KNOWN for c in commands), [c.cmd for c in commands if c.cmd not in KNOWN]
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG"}
    froms = [c for c in commands if c.cmd == "FROM"]
    assert len(froms) == 2, "one stage builds llama-server, the image is the other"
    build, final = (re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.value[0]) for f in froms)
    # The image is a CUDA *runtime* image: the drivers come from the host, compilers for CUDA are not needed
    # there; they are in the build stage only, which compiles llama-server with CUDA from the same CUDA release.
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu\d\d\.\d\d", final), final
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?devel-ubuntu\d\d\.\d\d", build), build
    assert build.split(":")[1].split("-")[0] == final.split(":")[1].split("-")[0]
    assert [v.lower() for v in froms[0].value[1:]] == ["as", "llama-server"]


def test_llama_server_is_built_as_a_node_builds_it_with_cuda(commands: tuple) -> None:
    stage_end = [i for i, c in enumerate(commands) if c.cmd == "FROM"][1]
    stage = commands[:stage_end]
    env = " ".join(" ".join(c.value) for c in stage if c.cmd == "ENV")
    assert "INFERNODE_BUILD_GPU=1" in env or "INFERNODE_BUILD_GPU 1" in env
    runs = " ".join(c.value[0] for c in stage if c.cmd == "RUN")
    assert "infernode runtimes build llamacpp" in runs and "infernode runtimes path llamacpp" in runs
    [copy] = [c for c in commands[stage_end:] if c.cmd == "COPY" and c.flags]
    assert copy.flags == ("--from=llama-server",) and copy.value == ("/out/llama-server", "/opt/infernode/runtimes/llamacpp/bin/llama-server")
    install_at = next(i for i, c in enumerate(commands) if c.cmd == "RUN" and "install.sh" in c.value[0])
    assert commands.index(copy) < install_at, "the installer finds the binary in place and keeps it"


def test_everything_copied_exists_in_git_and_passes_dockerignore(commands: tuple) -> None:
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [c for c in commands if c.cmd in ("COPY", "ADD")]
    assert copies
    for c in copies:
        assert c.cmd == "COPY", c.original
        if c.flags:  # only the built llama-server comes from elsewhere: the build stage
            assert c.flags == ("--from=llama-server",), c.original
            continue
        for src in c.value[:-1]:
            assert (REPO / src).exists(), f"{c.original}: {src} does not exist"
            under = [t for t in tracked if t == src or t.startswith(src.rstrip("/") + "/")]
            assert under, f"{c.original}: {src} is not in git"
            assert not dockerignored(src, patterns), f"{src} is excluded by .dockerignore"
    # ...and what must stay out, does.
    for private in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".infernode/admin.key", "node/__pycache__/x.pyc"):
        assert dockerignored(private, patterns), private


def test_the_installer_builds_the_image_with_flags_it_has(commands: tuple) -> None:
    install = (REPO / "installer/install.sh").read_text()
    runs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    call = re.search(r"/src/installer/install\.sh ([^&]*)", runs)
    assert call, "the image is built with installer/install.sh"
    flags = re.findall(r"(--[a-z-]+)", call.group(1))
    assert {"--no-systemd", "--runtime"} <= set(flags)
    for flag in flags:
        assert f"        {flag})" in install, f"install.sh has no {flag}"
    assert re.search(r"--runtime [a-z,]*vllm", call.group(1)), "the image ships vLLM"
    assert re.search(r"--runtime [a-z,]*llamacpp", call.group(1)), "the image ships llama-server"
    assert "rm -f /etc/infernode/admin.key" in runs, "no admin key may be baked into the image"
    run_flags = {f for c in commands if c.cmd == "RUN" for f in c.flags}
    assert "--mount=type=cache,target=/root/.cache/pip" in run_flags  # pip's cache, not a layer


def test_image_conventions(commands: tuple) -> None:
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    last_run = max(i for i, c in enumerate(commands) if c.cmd == "RUN")
    assert max(i for i, c in enumerate(commands) if c.cmd == "USER") > last_run
    assert one(commands, "VOLUME").value == ("/var/lib/infernode",)
    assert one(commands, "EXPOSE").value == ("8080",)
    hc = one(commands, "HEALTHCHECK")
    assert hc.value[0] == "CMD" and "http://127.0.0.1:8080/readyz" in hc.value[1] and "-f" in hc.value[1]
    assert any(f.startswith("--start-period=") for f in hc.flags)  # model loads take minutes
    # Exec form, so SIGTERM reaches the node (through tini) rather than a shell.
    entry, cmd = one(commands, "ENTRYPOINT"), one(commands, "CMD")
    assert entry.json and cmd.json
    assert entry.value[-1] == "/opt/infernode/current/bin/infernode" and cmd.value == ("up",)
    env = " ".join(" ".join(c.value) for c in commands if c.cmd == "ENV")
    assert "INFERNODE_CONFIG /etc/infernode/appliance.toml" in env or "INFERNODE_CONFIG=/etc/infernode/appliance.toml" in env
    listen = re.search(r"--listen (\S+)", " ".join(c.value[0] for c in commands if c.cmd == "RUN"))
    assert listen and listen.group(1) == "0.0.0.0:8080"  # a container must listen beyond its loopback


def test_compose_reserves_gpus_and_keeps_data() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    svc = compose["services"]["infernode"]
    assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile.gpu"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "8080:8080" in svc["ports"]
    volume, target = svc["volumes"][0].split(":")[:2]
    assert target == "/var/lib/infernode" and volume in compose["volumes"]
    grace = int(svc["stop_grace_period"].rstrip("s"))
    assert grace >= 45  # drain_grace_s + stop_timeout_s
    json.dumps(compose)  # plain data, no YAML-only types
