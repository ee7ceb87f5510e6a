"""Runtime servers built from pinned sources: a real (small) CMake project, served over loopback HTTP.

The same machinery builds llama-server; here a hello-world C project keeps each build to
seconds. Real cmake, ninja and cc; real HTTP; the archive's sha256 decides everything.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from node.supply.builds import BuildError, ServerCache, build_key, cache_root, extract_project, locate, wants_gpu
from node.supply.download import NetSettings
from runtimes import ServerBinary, SourceBuild

pytestmark = pytest.mark.skipif(not all(os.access(f"/usr/bin/{t}", os.X_OK) or
                                        any(os.access(Path(d) / t, os.X_OK) for d in os.environ.get("PATH", "").split(":"))
                                        for t in ("cmake", "ninja", "cc")),
                                reason="needs cmake, ninja and a C compiler")

CMAKELISTS = """cmake_minimum_required(VERSION 3.16)
project(hello C)
option(HELLO_GPU "the GPU variant" OFF)
add_executable(hello hello.c)
if(HELLO_GPU)
  target_compile_definitions(hello PRIVATE VARIANT="gpu")
else()
  target_compile_definitions(hello PRIVATE VARIANT="cpu")
endif()
add_executable(other other.c)
"""
HELLO_C = '#include <stdio.h>\nint main(void) { printf("hello %s\\n", VARIANT); return 0; }\n'


def tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def hello_sources(other_c: str = "int main(void) { return 0; }\n") -> dict[str, bytes]:
    return {"pkg-1.0/README": b"not part of the project\n",
            "pkg-1.0/vendor/hello/CMakeLists.txt": CMAKELISTS.encode(),
            "pkg-1.0/vendor/hello/hello.c": HELLO_C.encode(),
            "pkg-1.0/vendor/hello/other.c": other_c.encode()}


@dataclass
class Served:
    blobs: dict[str, bytes]
    gets: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def served() -> Iterator[Served]:
    state = Served(blobs={})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            state.gets.append(self.path)
            data = state.blobs.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def recipe(served: Served, archive: bytes, *, sha256: str | None = None, target: str = "hello",
           gpu_tool: str | None = None) -> ServerBinary:
    served.blobs["/pkg-1.0.tar.gz"] = archive
    build = SourceBuild(url=served.url + "/pkg-1.0.tar.gz", sha256=sha256 or hashlib.sha256(archive).hexdigest(),
                        size=len(archive), project="pkg-1.0/vendor/hello", target=target, artifact=target,
                        cmake_args=("-DCMAKE_BUILD_TYPE=Release",), gpu_cmake_args=("-DHELLO_GPU=ON",), gpu_tool=gpu_tool)
    return ServerBinary(name="hello", build=build)


class Steps:
    """Records what a build reports."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.updates: list[tuple[int, int]] = []

    def stage(self, text: str, total: int) -> None:
        self.stages.append(text)

    def update(self, done: int, total: int) -> None:
        self.updates.append((done, total))


def cache_at(root: Path, env: dict[str, str] | None = None) -> ServerCache:
    return ServerCache(root, env={**os.environ, **(env or {})}, net=NetSettings(retries=0, backoff_s=0))


def test_fetches_verifies_builds_and_caches(served: Served, tmp_path: Path) -> None:
    server = recipe(served, tarball(hello_sources()))
    steps = Steps()
    cache = cache_at(tmp_path / "cache")
    assert cache.find(server) is None
    built = cache.ensure(server, steps)
    assert built == tmp_path / "cache" / "runtimes" / "hello" / build_key(server.build, False) / "bin" / "hello"  # type: ignore[arg-type]
    assert subprocess.run([built], capture_output=True, text=True, check=True).stdout == "hello cpu\n"
    assert steps.stages[0] == "download pkg-1.0.tar.gz" and any(s.startswith("compile hello") for s in steps.stages)
    assert steps.updates and steps.updates[-1][0] == steps.updates[-1][1]  # ninja's last [n/N]
    # Only the binary, its log and its note stay: the sources and build tree are gone.
    key_dir = built.parent.parent
    assert sorted(p.name for p in key_dir.iterdir()) == ["bin", "build.json", "build.lock", "build.log"]
    assert served.gets == ["/pkg-1.0.tar.gz"]
    # Cached: the next call neither downloads nor builds.
    mtime = built.stat().st_mtime_ns
    again = Steps()
    assert cache.ensure(server, again) == built and cache.find(server) == built
    assert again.stages == [] and served.gets == ["/pkg-1.0.tar.gz"] and built.stat().st_mtime_ns == mtime


def test_a_wrong_digest_builds_nothing(served: Served, tmp_path: Path) -> None:
    server = recipe(served, tarball(hello_sources()), sha256="0" * 64)
    with pytest.raises(BuildError, match="not the pinned ones"):
        cache_at(tmp_path / "cache").ensure(server)
    assert not list((tmp_path / "cache" / "sources").rglob("*.gz")) and not list((tmp_path / "cache").rglob("partial/*"))
    assert not list((tmp_path / "cache" / "runtimes").rglob("bin"))
    assert not list((tmp_path / "cache" / "runtimes").rglob("CMakeLists.txt"))  # never unpacked


@pytest.mark.parametrize("members,links,why", [
    ({"pkg-1.0/vendor/hello/../../../evil": b"x"}, None, "unsafe member name"),
    ({"/etc/evil": b"x"}, None, "unsafe member name"),
    ({}, {"pkg-1.0/vendor/hello/hello.c": "/etc/passwd"}, "link or special file"),
])
def test_unsafe_archives_are_refused(tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None,
                                     why: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tarball({**hello_sources(), **members}, links))
    with pytest.raises(BuildError, match=why):
        extract_project(archive, "pkg-1.0/vendor/hello", tmp_path / "out")
    assert not (tmp_path / "evil").exists()
    with pytest.raises(BuildError, match="unsafe project"):
        extract_project(archive, "../x", tmp_path / "out2")


def test_only_the_project_is_unpacked_and_garbage_is_an_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tarball(hello_sources()))
    project = extract_project(archive, "pkg-1.0/vendor/hello", tmp_path / "out")
    assert sorted(p.name for p in project.iterdir()) == ["CMakeLists.txt", "hello.c", "other.c"]
    assert not (tmp_path / "out" / "pkg-1.0" / "README").exists()
    with pytest.raises(BuildError, match="nothing under"):
        extract_project(archive, "pkg-2.0", tmp_path / "out2")
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BuildError, match="not a readable archive"):
        extract_project(tmp_path / "junk.tar.gz", "pkg-1.0", tmp_path / "out3")


def test_a_failing_compile_names_the_error_and_the_log(served: Served, tmp_path: Path) -> None:
    server = recipe(served, tarball(hello_sources(other_c="int main(void) { return nope; }\n")), target="other")
    with pytest.raises(BuildError, match=r"failed \(exit \d+\):.*error.*full log: .*build.log") as e:
        cache_at(tmp_path / "cache").ensure(server)
    log = Path(e.value.message.rsplit("full log: ", 1)[1])
    assert b"nope" in log.read_bytes()
    assert not list((tmp_path / "cache" / "runtimes").rglob("bin/*"))


def test_missing_tools_are_named_with_the_fix(served: Served, tmp_path: Path, monkeypatch) -> None:
    server = recipe(served, tarball(hello_sources()))
    empty = tmp_path / "empty-path"
    empty.mkdir()
    # Neither on PATH nor beside the interpreter (where the `cmake` and `ninja` wheels of the llamacpp extra go).
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    with pytest.raises(BuildError, match="needs cmake and ninja: pip install cmake ninja"):
        cache_at(tmp_path / "cache", {"PATH": str(empty)}).ensure(server)


def test_gpu_variant_on_a_gpu_box_with_its_compiler(served: Served, tmp_path: Path) -> None:
    """GPUs and a GPU compiler on PATH add the GPU flags, under a key of its own (the CPU build stays)."""
    server = recipe(served, tarball(hello_sources()), gpu_tool="fakenvcc")
    bindir = tmp_path / "gpu-bin"
    bindir.mkdir()
    (bindir / "fakenvcc").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "fakenvcc").chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    base = {k: v for k, v in os.environ.items() if k != "INFERNODE_BUILD_GPU"}  # the test session sets 0
    assert build_key(server.build, True) != build_key(server.build, False)  # type: ignore[arg-type]
    b = server.build
    assert b is not None
    assert wants_gpu(b, {**base, **env}, gpus=True)
    assert not wants_gpu(b, {**base, **env}, gpus=False)  # a compiler alone (pip's nvcc) is not a GPU box
    assert not wants_gpu(b, {"PATH": str(tmp_path)}, gpus=True)
    assert wants_gpu(b, {"INFERNODE_BUILD_GPU": "1"}) and not wants_gpu(b, {**env, "INFERNODE_BUILD_GPU": "0"}, gpus=True)
    with pytest.raises(BuildError, match="INFERNODE_BUILD_GPU='yes'"):
        wants_gpu(b, {"INFERNODE_BUILD_GPU": "yes"})
    built = ServerCache(tmp_path / "cache", env={**base, **env}, gpus=True).ensure(server)
    assert subprocess.run([built], capture_output=True, text=True, check=True).stdout == "hello gpu\n"
    assert ServerCache(tmp_path / "cache", env=base).find(server) is None  # the CPU variant is not built yet


def test_two_processes_build_once(served: Served, tmp_path: Path) -> None:
    server = recipe(served, tarball(hello_sources()))
    results: list[Path] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(cache_at(tmp_path / "cache").ensure(server))
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert served.gets == ["/pkg-1.0.tar.gz"]  # the second waited for the lock, then found the build


def test_cancel_stops_the_compilers(served: Served, tmp_path: Path) -> None:
    slow = CMAKELISTS + 'add_custom_target(slow ALL COMMAND sleep 60)\nadd_dependencies(hello slow)\n'
    sources = {**hello_sources(), "pkg-1.0/vendor/hello/CMakeLists.txt": slow.encode()}
    server = recipe(served, tarball(sources))
    cancel = threading.Event()
    caught: list[BaseException] = []

    def run() -> None:
        try:
            cache_at(tmp_path / "cache").ensure(server, cancel=cancel)
        except BaseException as exc:
            caught.append(exc)
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.rglob("build.ninja")):
        time.sleep(0.1)
    time.sleep(0.5)
    started = time.monotonic()
    cancel.set()
    t.join(30)
    assert not t.is_alive() and time.monotonic() - started < 10
    assert caught and isinstance(caught[0], BuildError) and "cancelled" in caught[0].message


def test_locate_prefers_config_then_path_then_cache(served: Served, tmp_path: Path) -> None:
    server = recipe(served, tarball(hello_sources()))
    cache = cache_at(tmp_path / "cache")
    env = {"PATH": str(tmp_path / "nothing")}
    assert locate(server, None, cache, env) is None
    built = cache.ensure(server)
    assert locate(server, None, cache, env) == built
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "hello").write_text("#!/bin/sh\n")
    (on_path / "hello").chmod(0o755)
    assert locate(server, None, cache, {"PATH": str(on_path)}) == on_path / "hello"
    assert locate(server, str(built), cache, {"PATH": str(on_path)}) == built  # the configured one wins
    assert locate(server, "/opt/mine/hello", cache, {"PATH": str(on_path)}) is None  # configured, not there
    assert locate(server, "hello", cache, {"PATH": str(on_path)}) == on_path / "hello"
    assert locate(server, "absent-name", cache, {"PATH": str(on_path)}) is None


def test_cache_root_follows_the_environment(tmp_path: Path) -> None:
    assert cache_root({"INFERNODE_CACHE_DIR": str(tmp_path / "c")}) == tmp_path / "c"
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path / "x")}) == tmp_path / "x" / "infernode"
    assert cache_root({}) == Path.home() / ".cache" / "infernode"


def test_cli_names_bad_runtimes_and_says_when_nothing_is_built(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    bare = {"INFERNODE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    p = run_cli("runtimes", "build", "vllm", env=bare)
    assert p.returncode == 2 and "no runtime 'vllm' to build; use one of llamacpp" in p.stderr
    p = run_cli("runtimes", "build", "--sources", str(tmp_path / "x.tar.gz"), "llamacpp", "llamacpp", env=bare)
    assert p.returncode == 2 and "--sources is the archive of one runtime" in p.stderr
    p = run_cli("runtimes", "path", "llamacpp", env=bare)
    assert p.returncode == 1 and "infernode runtimes build llamacpp" in p.stderr
    # A copy of the archive that is not the pinned one is refused before anything is unpacked.
    (tmp_path / "x.tar.gz").write_bytes(tarball(hello_sources()))
    p = run_cli("runtimes", "build", "llamacpp", "--sources", str(tmp_path / "x.tar.gz"), "--force", env=bare)
    assert p.returncode == 1 and "is not the pinned source of llama-server" in p.stderr, p.stderr
    assert not list((tmp_path / "cache").rglob("CMakeLists.txt"))


def test_the_node_builds_a_missing_server_before_it_launches_one(served: Served, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """What `infernode up` does on a fresh machine, with the small project in llama-server's place."""
    import asyncio
    import logging

    import httpx

    from node.config import parse_config
    from node.supply.lockfile import LockFile
    from node.supply.store import Store
    from node.workers.gpus import Inventory
    from node.workers.router import Router
    from node.workers.supervisor import Supervisor
    from runtimes import llamacpp

    hello = recipe(served, tarball(hello_sources()))
    monkeypatch.setattr(llamacpp, "SERVER", hello)
    monkeypatch.setenv("INFERNODE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # cmake, ninja and cc; no `hello`
    config = parse_config({"node": {"data_dir": str(tmp_path / "data")},
                           "models": [{"name": "m", "source": "file:x.gguf", "runtime": "llamacpp"}]},
                          tmp_path / "appliance.toml")

    async def check(build: bool) -> tuple[bool, str, dict[str, str]]:
        async with httpx.AsyncClient() as client:
            sup = Supervisor(config, LockFile(), Store(tmp_path / "store"), Inventory(()), Router(()), client)
            c = await sup.check_runtime("llamacpp", build=build)
            return c.ok, c.detail, sup.servers

    ok, detail, _ = asyncio.run(check(build=False))  # doctor: says what to run, never builds
    assert not ok and "run `infernode runtimes build llamacpp`" in detail and not served.gets
    with caplog.at_level(logging.INFO, logger="infernode.supervisor"):
        ok, detail, servers = asyncio.run(check(build=True))
    built = tmp_path / "cache" / "runtimes" / "hello" / build_key(hello.build, False) / "bin" / "hello"  # type: ignore[arg-type]
    assert ok and detail == "hello cpu" and servers == {"llamacpp": str(built)}  # `hello --version` ran
    lines = [r.getMessage() for r in caplog.records]
    assert any("hello is not on PATH and not built yet: building it" in ln for ln in lines)
    assert any(ln.startswith("llamacpp: hello: compile hello 100%") for ln in lines)
    assert len([ln for ln in lines if "compile hello" in ln]) <= 12  # a line per tenth, not per step
    assert asyncio.run(check(build=False))[:2] == (True, "hello cpu")  # cached: found without a build


def test_a_local_copy_of_the_sources_builds_without_the_network(served: Served, tmp_path: Path) -> None:
    archive = tarball(hello_sources())
    server = recipe(served, archive)
    (tmp_path / "copy.tar.gz").write_bytes(archive)
    built = cache_at(tmp_path / "cache").ensure(server, sources=tmp_path / "copy.tar.gz")
    assert subprocess.run([built], capture_output=True, text=True, check=True).stdout == "hello cpu\n"
    assert served.gets == []  # verified from the copy, never downloaded
