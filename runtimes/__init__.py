"""Runtime adapters: each turns a worker spec into a launch plan.

An adapter is a plain module with `NAME`, `LAYOUT`, `plan(spec) -> LaunchPlan` and
`version_argv(spec)`; a runtime whose server is one executable the node can build also
has `SERVER` (a `ServerBinary`: its name on PATH and the pinned sources it builds from). It never starts a process, opens a socket or imports `node`:
the supervisor does the doing, the adapter only describes. Everything that differs
between runtimes is said here (the plan's fields, the module's attributes), so the
node never compares a runtime's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol


class ModelLayout(str, Enum):
    """What in the store a runtime is pointed at (its `model_path`)."""

    GGUF_FILE = "gguf_file"       # the model's first .gguf file
    HF_FOLDER = "hf_folder"       # the folder holding the model's config.json (else the model's root)
    OLLAMA_TREE = "ollama_tree"   # the store's OLLAMA_MODELS tree (manifests/ and blobs/)

    @property
    def file_format(self) -> str:
        """The weights' file format in this layout (what Ollama's /api/show calls `format`)."""
        return "safetensors" if self is ModelLayout.HF_FOLDER else "gguf"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an adapter needs to describe one replica."""

    model: str                      # the name clients send and the worker serves
    replica: int
    runtime: str
    port: int
    host: str = "127.0.0.1"
    model_path: Path | None = None  # snapshot folder, GGUF file or OLLAMA_MODELS tree
    source: str = ""
    registry: str | None = None     # the model's registry, when not its source's default (ollama)
    gpu_uuids: tuple[str, ...] = ()
    gpu_memory_fraction: float | None = None  # this replica's share of each of its GPUs
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = "python3"         # interpreter of the runtime's environment
    binary: str | None = None       # executable for binary runtimes (ollama)
    max_model_len: int | None = None
    url: str | None = None          # external runtime: the OpenAI base URL
    startup_timeout_s: float | None = None
    api_key: str | None = field(default=None, repr=False)  # external runtime: sent as a bearer token
    sleep: bool = False             # idle through the runtime's sleep mode, where it has one
    concurrency: int | None = None  # requests the replica should serve at once (the model's `concurrency`)


@dataclass(frozen=True)
class Probe:
    """An HTTP GET relative to the worker's root; ok on 200 (and `expect_model` listed)."""

    path: str
    expect_model: str | None = None


@dataclass(frozen=True)
class Warmup:
    """A POST (JSON body) sent once after the worker is healthy, before it counts as ready; 200 passes."""

    path: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class SleepControl:
    """How to put a worker to sleep (GPU memory freed, process kept) and wake it, relative to its root."""

    sleep: tuple[str, str]          # (method, path): the request that frees the GPU
    wake: tuple[str, str]           # the request that restores it
    is_sleeping: str                # GET: JSON {"is_sleeping": bool}


class SchemaOutput(str, Enum):
    """How a runtime takes `response_format: {"type": "json_schema"}`."""

    NATIVE = "native"              # as OpenAI sends it (enforced by the runtime)
    JSON_OBJECT_SCHEMA = "json_object_schema"  # as {"type": "json_object", "schema": S} (llama-cpp-python's grammar)


@dataclass(frozen=True)
class Dialect:
    """Where a runtime's chat/completions dialect differs from OpenAI's; the node maps requests to it.

    The default speaks OpenAI's as is. Each field says what the runtime does differently,
    so that nothing a client asks for is silently ignored: mapped, or refused with a 400.
    """

    # The content an assistant turn holding only tool calls must carry (None: `null` is accepted).
    tool_turn_content: str | None = None
    # False: the runtime ignores `max_completion_tokens`; the node sends it as `max_tokens`.
    max_completion_tokens: bool = True
    schema_output: SchemaOutput = SchemaOutput.NATIVE
    # Fields the runtime ignores, with the value it always behaves as: another value is a 400 naming the field.
    ignores: Mapping[str, Any] = field(default_factory=dict)

    @property
    def native(self) -> bool:
        """Whether requests go to the runtime unchanged."""
        return (self.tool_turn_content is None and self.max_completion_tokens
                and self.schema_output is SchemaOutput.NATIVE and not self.ignores)


OPENAI = Dialect()


@dataclass(frozen=True)
class LaunchPlan:
    argv: tuple[str, ...]           # empty for a worker the node does not launch (external)
    env: Mapping[str, str]
    root_url: str                   # http://127.0.0.1:PORT (where probes go)
    openai_base: str                # where /v1 traffic goes (no trailing slash)
    health: Probe                   # liveness
    ready: Probe                    # readiness
    startup_timeout_s: float
    warmup: tuple[Warmup, ...] = ()
    metrics_path: str | None = None
    # False when streams carry no usage chunk even with stream_options.include_usage.
    stream_usage: bool = True
    upstream_model: str | None = None  # the model name the worker expects, when it differs
    context_length: int | None = None  # the context the worker launches with, when the plan sets it
    # True when the worker rejects an x-request-id that is not a UUID (the node then sends one derived from it).
    uuid_request_ids: bool = False
    # Sent with every request to the worker (probes and traffic), e.g. an external server's key.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    sleep: SleepControl | None = None  # set when the spec asked for sleep and the runtime has it
    # Client APIs besides OpenAI's chat/completions the worker serves itself under /v1
    # ("responses": POST /v1/responses); the node passes those through untranslated.
    native_apis: tuple[str, ...] = ()
    # OpenAI endpoints ("embeddings", ...) this worker cannot serve, with why and the fix:
    # the node answers those with a 400 instead of passing the worker's internal error on.
    cannot: Mapping[str, str] = field(default_factory=dict)
    dialect: Dialect = OPENAI          # how its chat/completions differ from OpenAI's
    # Requests the worker serves well at once (e.g. llama-server's parallel slots): the node sends it no more and
    # queues the rest itself, in fair order; None: no cap but the model's max_inflight.
    concurrency: int | None = None
    # False when the worker closes its connection after a streamed answer without saying so (no
    # `Connection: close`): the node then never reuses such a connection, which would fail as it is reused.
    keeps_stream_connections: bool = True
    # Where the runtime schedules by a per-request `priority` in the body: its value per band
    # ("interactive", "batch"); None when it has no such scheduling (then the field is not sent).
    priorities: Mapping[str, int] | None = None


@dataclass(frozen=True)
class SourceBuild:
    """How a runtime's server is built from pinned sources with CMake: data only, node/ does the work."""

    url: str                        # the source archive (a .tar.gz)
    sha256: str                     # of that archive: nothing else is ever built
    size: int
    project: str                    # the CMake project's folder inside the archive
    target: str                     # what `cmake --build --target` builds
    artifact: str                   # the built executable, relative to the build folder
    cmake_args: tuple[str, ...]     # configure flags for every build
    # Added when `gpu_tool` (a GPU compiler, e.g. nvcc) is found, so the server can offload to the GPU.
    gpu_cmake_args: tuple[str, ...] = ()
    gpu_tool: str | None = None


@dataclass(frozen=True)
class ServerBinary:
    """A runtime's server executable: looked up on PATH by `name`, else built from `build`."""

    name: str
    build: SourceBuild | None = None


class Runtime(Protocol):
    NAME: str
    LAYOUT: ModelLayout | None      # None: the node launches nothing and pins no model (external)

    def plan(self, spec: WorkerSpec) -> LaunchPlan: ...

    def version_argv(self, spec: WorkerSpec) -> tuple[str, ...]: ...


NAMES = ("vllm", "sglang", "ollama", "llamacpp", "external")


def get(name: str) -> Runtime:
    """The adapter module for a runtime name."""
    if name not in NAMES:
        raise KeyError(name)
    module: ModuleType = importlib.import_module(f"runtimes.{name}")
    return module


def server_binary(name: str) -> ServerBinary | None:
    """The server executable a runtime runs, when it is one the node finds or builds (else None)."""
    found: ServerBinary | None = getattr(get(name), "SERVER", None)
    return found


def runs_python(name: str) -> bool:
    """Whether the runtime's workers are a Python module run by an interpreter (its `[runtimes.NAME] python`)."""
    return getattr(get(name), "MODULE", None) is not None


def launched(name: str) -> bool:
    """Whether the node launches this runtime's workers (and so pins, pulls, places and version-checks them)."""
    return get(name).LAYOUT is not None


def flag_value(argv: tuple[str, ...], *flags: str) -> str | None:
    """The value of the last of these flags in argv (`--flag V` or `--flag=V`), if any."""
    value = None
    for i, a in enumerate(argv):
        for f in flags:
            if a == f and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(f + "="):
                value = a.split("=", 1)[1]
    return value


def int_or_none(text: str | None) -> int | None:
    """An int flag's value, or None when unset or not a number (the runtime will say so itself)."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def local_plan(spec: WorkerSpec, argv: list[str] | tuple[str, ...], env: Mapping[str, str], *,
               health: Probe, ready: Probe, default_startup_timeout_s: float, **extra) -> LaunchPlan:
    """The plan of a worker the node launches on spec.host:spec.port, serving OpenAI under /v1.

    The worker sees only the GPUs placement gave it (none: an empty CUDA_VISIBLE_DEVICES).
    """
    root = f"http://{spec.host}:{spec.port}"
    return LaunchPlan(
        argv=tuple(argv),
        env={**env, "CUDA_VISIBLE_DEVICES": ",".join(spec.gpu_uuids)},
        root_url=root,
        openai_base=root + "/v1",
        health=health,
        ready=ready,
        startup_timeout_s=spec.startup_timeout_s or default_startup_timeout_s,
        **extra,
    )


def has_flag(args: tuple[str, ...], *flags: str) -> bool:
    """Whether the user's extra args already set one of these flags (then theirs wins)."""
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def python_module_version_argv(python: str, distributions: tuple[str, ...]) -> tuple[str, ...]:
    """A command printing the first installed distribution's version, or failing."""
    code = (
        "import importlib.metadata as m, sys\n"
        f"for d in {distributions!r}:\n"
        "    try:\n"
        "        print(m.version(d)); sys.exit(0)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        f"sys.exit('none of {', '.join(distributions)} is installed')\n"
    )
    return (python, "-c", code)
