"""Runtime servers built from pinned sources: fetched and verified like a model, built once, cached.

A runtime adapter says what to build as data (`runtimes.SourceBuild`: the source archive
and its sha256, the CMake project, target and flags); this module does it. The archive
is downloaded into a content-addressed store under the cache (resumable, hashed while
written, renamed into place only when its sha256 matches), so nothing unverified is
ever unpacked. Extraction takes only regular files and folders under the project, with
no absolute or `..` names. CMake configures with Ninja and builds the one target; the
executable is copied to `<cache>/runtimes/<name>/<key>/bin/<name>`, where `key` hashes
the archive's digest and the flags (a CUDA build and a CPU build are different keys),
and the build tree is removed. A file lock per key makes a second process wait for the
first one's build and then use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from node.errors import OperationFailed, StoreError
from node.supply.download import NetSettings, fetch_into
from node.supply.lockfile import LockedFile
from node.supply.store import Store
from runtimes import ServerBinary, SourceBuild

NINJA_STEP = re.compile(rb"^\[(\d+)/(\d+)\]")
LOG_TAIL_LINES = 15


class BuildError(OperationFailed):
    """A runtime's server could not be fetched or built; the message says why and what to do."""


class BuildProgress(Protocol):
    """What a build reports: a phase begins (with its size: bytes or build steps), then moves on."""

    def stage(self, text: str, total: int) -> None: ...
    def update(self, done: int, total: int) -> None: ...


class NullBuildProgress:
    def stage(self, text: str, total: int) -> None:
        pass

    def update(self, done: int, total: int) -> None:
        pass


class LogBuildProgress:
    """Reports to a logger: each phase, then every tenth of it (what `infernode up` shows in its log)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self._text, self._tenth = "", -1

    def stage(self, text: str, total: int) -> None:
        self._text, self._tenth = text, -1
        self.logger.info("%s: %s", self.what, text)

    def update(self, done: int, total: int) -> None:
        tenth = done * 10 // total if total else 0
        if tenth != self._tenth:
            self._tenth = tenth
            self.logger.info("%s: %s %d%% (%d of %d)", self.what, self._text, tenth * 10, done, total)


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    """Where built runtimes live: $INFERNODE_CACHE_DIR, else $XDG_CACHE_HOME/infernode, else ~/.cache/infernode."""
    if env.get("INFERNODE_CACHE_DIR"):
        return Path(env["INFERNODE_CACHE_DIR"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "infernode"


def build_key(build: SourceBuild, gpu: bool) -> str:
    """Names one build: the sources' digest and every flag that changes the binary."""
    what = {"sha256": build.sha256, "project": build.project, "target": build.target,
            "args": list(build.cmake_args) + (list(build.gpu_cmake_args) if gpu else [])}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _tool(name: str, env: Mapping[str, str]) -> str | None:
    """An executable on PATH, else beside this interpreter (the `cmake` and `ninja` wheels install there)."""
    found = shutil.which(name, path=env.get("PATH"))
    if found:
        return found
    here = Path(sys.executable).parent / name
    return str(here) if os.access(here, os.X_OK) else None


def wants_gpu(build: SourceBuild, env: Mapping[str, str] = os.environ, *, gpus: bool = False) -> bool:
    """Whether to build the GPU variant: $INFERNODE_BUILD_GPU (1 or 0) says so, else when the box
    has GPUs and the GPU compiler is on PATH or in /usr/local/cuda (a compiler alone is not enough:
    Python wheels install nvcc without the GPU libraries a build links)."""
    if not build.gpu_tool:
        return False
    forced = env.get("INFERNODE_BUILD_GPU", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise BuildError(f"INFERNODE_BUILD_GPU={forced!r}: use 1 (build for the GPU) or 0 (CPU only)")
    return gpus and (_tool(build.gpu_tool, env) is not None or os.access(f"/usr/local/cuda/bin/{build.gpu_tool}", os.X_OK))


class ServerCache:
    """Built runtime servers under `root` (see the module's docstring for the layout)."""

    def __init__(self, root: Path, *, env: Mapping[str, str] = os.environ,
                 net: NetSettings | None = None, gpus: bool = False) -> None:
        self.root = root
        self.env = env
        self.gpus = gpus  # whether the box has GPUs (then a GPU variant is built where it can be)
        self.net = net or NetSettings()
        self.sources = Store(root / "sources")

    def path(self, server: ServerBinary, gpu: bool) -> Path:
        assert server.build is not None
        return self.root / "runtimes" / server.name / build_key(server.build, gpu) / "bin" / server.name

    def find(self, server: ServerBinary) -> Path | None:
        """The cached build for this machine (GPU variant where it can build one), if it is there."""
        if server.build is None:
            return None
        p = self.path(server, wants_gpu(server.build, self.env, gpus=self.gpus))
        return p if os.access(p, os.X_OK) else None

    def ensure(self, server: ServerBinary, progress: BuildProgress | None = None,
               cancel: threading.Event | None = None, sources: Path | None = None) -> Path:
        """The cached build, building it first if needed (waits for another process's build).

        `sources`: a local copy of the archive (an air-gapped box), checked against the pinned
        sha256 like a download. Setting `cancel` stops a download or build in flight (BuildError).
        """
        if server.build is None:
            raise BuildError(f"{server.name} is not on PATH and the node has no recipe to build it")
        build, progress = server.build, progress or NullBuildProgress()
        gpu = wants_gpu(build, self.env, gpus=self.gpus)
        final = self.path(server, gpu)
        final.parent.parent.mkdir(parents=True, exist_ok=True)
        with _locked(final.parent.parent / "build.lock"):
            if os.access(final, os.X_OK):
                return final
            archive = self._fetch(build, progress, cancel, sources)
            with tempfile.TemporaryDirectory(prefix="build-", dir=final.parent.parent) as tmp:
                work = Path(tmp)
                progress.stage(f"unpack {PurePosixPath(build.url).name}", 0)
                source = extract_project(archive, build.project, work / "src")
                built = run_cmake(build, source, work / "build", gpu=gpu, env=self.env, progress=progress,
                                  log_path=final.parent.parent / "build.log", cancel=cancel)
                final.parent.mkdir(parents=True, exist_ok=True)
                partial = final.with_name(final.name + ".partial")
                shutil.copy2(built, partial)
                os.chmod(partial, 0o755)
                os.replace(partial, final)
            (final.parent.parent / "build.json").write_text(json.dumps(
                {"source": build.url, "sha256": build.sha256, "gpu": gpu, "built_at": time.time()}) + "\n")
            return final

    def _fetch(self, build: SourceBuild, progress: BuildProgress, cancel: threading.Event | None,
               local: Path | None) -> Path:
        """The verified source archive in the cache's store (downloaded, or resumed, when missing)."""
        locked = LockedFile(path=PurePosixPath(build.url).name, size=build.size, sha256=build.sha256)
        if self.sources.has(locked):
            return self.sources.blob_path(build.sha256)
        if local is not None:
            progress.stage(f"verify {local}", 0)
            try:
                with self.sources.writer(locked) as w, local.open("rb") as f:
                    if not w.present:  # hashed while copied, renamed in only when the sha256 matches
                        w.reset()
                        while chunk := f.read(1 << 20):
                            w.write(chunk)
                    return w.commit()
            except StoreError as exc:
                raise BuildError(f"{local} is not the pinned source of {build.target}: {exc.message}") from None
            except OSError as exc:
                raise BuildError(f"cannot read {local}: {exc.strerror or exc}") from None
        progress.stage(f"download {locked.path}", build.size)
        with self.sources.writer(locked) as w:
            if not w.present:
                done = [w.offset]

                def arrived(n: int) -> None:
                    done[0] += n
                    progress.update(done[0], build.size)
                try:
                    fetch_into(self.net.bulk_client(), build.url, w, self.net, on_bytes=arrived, cancel=cancel)
                except StoreError as exc:
                    raise BuildError(f"cannot fetch the sources of {build.target}: {exc.message}") from None
            try:
                w.commit()
            except StoreError as exc:  # wrong size or sha256: the partial file is gone, nothing is unpacked
                raise BuildError(f"the sources of {build.target} are not the pinned ones: {exc.message}") from None
        return self.sources.blob_path(build.sha256)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def extract_project(archive: Path, project: str, dest: Path) -> Path:
    """Unpack the members under `project/` into dest; links, devices, absolute or `..` names are refused."""
    prefix = PurePosixPath(project)
    if prefix.is_absolute() or ".." in prefix.parts:
        raise BuildError(f"unsafe project folder {project!r} in the build recipe")
    found = False
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts:
                    raise BuildError(f"{archive.name}: unsafe member name {m.name!r}; refusing to unpack it")
                if name.parts[:len(prefix.parts)] != prefix.parts:
                    continue
                if not (m.isfile() or m.isdir()):
                    raise BuildError(f"{archive.name}: {m.name} is a link or special file; refusing to unpack it")
                target = dest.joinpath(*name.parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None  # a regular file
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
                found = True
    except (tarfile.TarError, EOFError) as exc:
        raise BuildError(f"{archive.name}: not a readable archive ({exc})") from None
    if not found:
        raise BuildError(f"{archive.name} holds nothing under {project}/")
    return dest.joinpath(*prefix.parts)


def run_cmake(build: SourceBuild, source: Path, out: Path, *, gpu: bool, env: Mapping[str, str],
              progress: BuildProgress, log_path: Path, cancel: threading.Event | None = None) -> Path:
    """Configure with Ninja and build the target; the built executable's path (BuildError on failure)."""
    cmake, ninja = _tool("cmake", env), _tool("ninja", env)
    if cmake is None or ninja is None:
        missing = " and ".join(n for n, p in (("cmake", cmake), ("ninja", ninja)) if p is None)
        raise BuildError(f"building {build.target} needs {missing}: pip install cmake ninja "
                         "(or apt install cmake ninja-build)")
    if not any(_tool(cxx, env) for cxx in (env.get("CXX", "c++"), "g++", "clang++")):
        raise BuildError(f"building {build.target} needs a C++ compiler: apt install g++ (or set CXX)")
    args = [*build.cmake_args, *(build.gpu_cmake_args if gpu else ())]
    jobs = str(max(os.cpu_count() or 1, 1))
    with log_path.open("wb", buffering=0) as log:  # unbuffered: `tail -f` shows the build as it goes
        progress.stage(f"configure {build.target}" + (" (GPU)" if gpu else ""), 0)
        configure = [cmake, "-S", str(source), "-B", str(out), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", *args]
        try:
            _run(configure, env, log, log_path, None, cancel)
        except BuildError as exc:
            if gpu:  # say how to get a working CPU build rather than leave the box without one
                raise BuildError(f"{exc.message}; the GPU build needs the full GPU toolkit (libraries and "
                                 "headers, not only the compiler); INFERNODE_BUILD_GPU=0 builds for the CPU") from None
            raise
        progress.stage(f"compile {build.target}", 0)
        _run([cmake, "--build", str(out), "--target", build.target, "-j", jobs], env, log, log_path, progress, cancel)
    built = out / build.artifact
    if not os.access(built, os.X_OK):
        raise BuildError(f"the build finished without {build.artifact}; see {log_path}")
    return built


def _run(argv: list[str], env: Mapping[str, str], log: IO[bytes], log_path: Path,
         progress: BuildProgress | None, cancel: threading.Event | None) -> None:
    """Run one build command, its output to the log; ninja's `[n/N]` lines move the progress."""
    tail: list[bytes] = []
    try:
        # Its own process group, so a cancel stops the compilers too, not only cmake.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True)
    except OSError as exc:
        raise BuildError(f"cannot run {argv[0]}: {exc}") from None
    assert proc.stdout is not None

    def watch() -> None:
        while proc.poll() is None:
            if cancel is not None and cancel.wait(0.5):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return
            if cancel is None:
                return
    threading.Thread(target=watch, name="build-cancel", daemon=True).start()
    with proc:
        for line in proc.stdout:
            log.write(line)
            tail = [*tail[-(LOG_TAIL_LINES - 1):], line]
            step = NINJA_STEP.match(line)
            if step and progress is not None:
                progress.update(int(step[1]), int(step[2]))
    if cancel is not None and cancel.is_set():
        raise BuildError(f"the build of {Path(argv[0]).name} was cancelled; it starts again next time")
    if proc.returncode != 0:
        last = b"".join(tail).decode(errors="replace").strip().splitlines()
        why = next((x for x in reversed(last) if "error" in x.lower()), last[-1] if last else "no output")
        raise BuildError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {why.strip()}; full log: {log_path}")


def locate(server: ServerBinary, configured: str | None, cache: ServerCache,
           env: Mapping[str, str] = os.environ) -> Path | None:
    """The server to run: the configured path (or name on PATH), else `name` on PATH, else a cached build."""
    if configured:  # never built in its place: a configured server that is not there is an error to report
        found = shutil.which(configured, path=env.get("PATH")) if "/" not in configured else configured
        return Path(found) if found and os.access(found, os.X_OK) else None
    on_path = shutil.which(server.name, path=env.get("PATH"))
    return Path(on_path) if on_path else cache.find(server)
