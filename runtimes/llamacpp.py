"""llama.cpp through its own OpenAI server, `llama-server` (C++, tools/server in llama.cpp).

Flags follow llama-server's `--help` (common/arg.cpp): `-m PATH --alias NAME --host
--port`, `-np` (parallel slots: the replica's concurrency) and `-c` (the KV cache: the
model's context times the slots) with `--no-kv-unified` (each slot holds one whole
context; a pool shared by the slots, `--kv-unified`, lets requests running together
exhaust it, and llama-server then fails them), `--jinja` (the model's
chat template, tool calls included), `--metrics` (Prometheus `/metrics`, `llamacpp:*`),
and `--embeddings` / `--reranking` where the user's args say the model is one. Threads
(`-t`) and GPU layers (`-ngl`) are llama.cpp's defaults (physical cores; `auto` fits the
layers in the GPUs placement gave) unless the model's args set them.

`GET /health` answers 503 while the model loads and `{"status":"ok"}` once it serves;
it is answered outside the slots, so a long generation never looks like a dead worker.
Streams end with an exact usage chunk when `stream_options.include_usage` is set, and
request ids of any shape are accepted: no shim is needed. Its `/v1/messages` and
`/v1/responses` are not claimed as native: the node's own translations keep one
behaviour (and exact usage) for every runtime.

Where the binary comes from: `[runtimes.llamacpp] server`, else `llama-server` on PATH,
else the node builds `SERVER.build` (the llama.cpp that llama-cpp-python 0.3.36's sdist
vendors, pinned by sha256) with CMake and caches it.
"""

from __future__ import annotations

from runtimes import (
    LaunchPlan,
    ModelLayout,
    Probe,
    ServerBinary,
    SourceBuild,
    WorkerSpec,
    flag_value,
    has_flag,
    int_or_none,
    local_plan,
)

NAME = "llamacpp"
LAYOUT = ModelLayout.GGUF_FILE
DEFAULT_STARTUP_TIMEOUT_S = 300.0
DEFAULT_N_CTX = 2048
# Parallel slots when the model's args set none: a few requests decode together, which
# on CPU and GPU alike beats one at a time (llama-server's own automatic choice is 4).
DEFAULT_PARALLEL = 4

CTX_FLAGS = ("-c", "--ctx-size")
PARALLEL_FLAGS = ("-np", "--parallel")
EMBEDDING_FLAGS = ("--embedding", "--embeddings")
RERANK_FLAGS = ("--rerank", "--reranking")
KV_UNIFIED_FLAGS = ("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified")

SERVER = ServerBinary(
    name="llama-server",
    build=SourceBuild(
        # llama-cpp-python 0.3.36's sdist from PyPI: it vendors llama.cpp (commit 0c1e570), server included.
        url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
            "llama_cpp_python-0.3.36.tar.gz",
        sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        size=76589250,
        project="llama_cpp_python-0.3.36/vendor/llama.cpp",
        target="llama-server",
        artifact="bin/llama-server",
        cmake_args=(
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_CURL=OFF",        # the node pulls models itself; no libcurl needed
            "-DGGML_NATIVE=OFF",       # portable: the binary runs on any x86-64 the box may become
            "-DBUILD_SHARED_LIBS=OFF",  # one self-contained file, movable into the cache
        ),
        gpu_cmake_args=("-DGGML_CUDA=ON",),
        gpu_tool="nvcc",
    ),
)


def plan(spec: WorkerSpec) -> LaunchPlan:
    """The command line, environment and probes for one llama-server replica."""
    if spec.model_path is None:
        raise ValueError("llamacpp needs a GGUF file (model_path)")
    args = spec.args
    argv = [
        spec.binary or SERVER.name,
        "-m", str(spec.model_path),
        "--alias", spec.model,
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    slots = int_or_none(flag_value(args, *PARALLEL_FLAGS)) or spec.concurrency or DEFAULT_PARALLEL
    if not has_flag(args, *CTX_FLAGS):
        # Each slot holds a whole context (as Ollama sizes num_ctx x parallel): requests running at once
        # can never run out of KV together, which a pool shared by the slots (--kv-unified) allows.
        argv += ["-c", str((spec.max_model_len or DEFAULT_N_CTX) * max(slots, 1))]
    if not has_flag(args, *PARALLEL_FLAGS):
        argv += ["-np", str(slots)]  # the model's concurrency, else a few
    if not has_flag(args, *KV_UNIFIED_FLAGS):
        argv.append("--no-kv-unified")
    if not has_flag(args, "--jinja", "--no-jinja"):
        argv.append("--jinja")
    if not has_flag(args, "--metrics"):
        argv.append("--metrics")
    argv += list(args)
    full = tuple(argv)
    slots = int_or_none(flag_value(full, *PARALLEL_FLAGS)) or DEFAULT_PARALLEL
    context = int_or_none(flag_value(full, *CTX_FLAGS))
    if context and not has_flag(args, "-kvu", "--kv-unified"):
        context //= max(slots, 1)  # without a shared pool each slot holds an equal part of -c
    cannot: dict[str, str] = {}
    if not has_flag(args, *EMBEDDING_FLAGS):
        cannot["embeddings"] = ("llama-server makes embeddings only when started with --embeddings; add "
                                "\"--embeddings\" to this model's args (and use an embedding model)")
    if not has_flag(args, *RERANK_FLAGS):
        cannot["rerank"] = ("llama-server reranks only when started with --reranking; add \"--reranking\" "
                            "to this model's args (and use a reranking model)")
    return local_plan(
        spec, argv, spec.env,
        health=Probe("/health"),
        ready=Probe("/v1/models", expect_model=spec.model),
        default_startup_timeout_s=DEFAULT_STARTUP_TIMEOUT_S,
        metrics_path="/metrics",
        stream_usage=True,
        context_length=context,
        cannot=cannot,
        concurrency=slots if slots > 0 else DEFAULT_PARALLEL,
        # It answers a stream with `Keep-Alive: timeout=5, max=100` and then closes the connection.
        keeps_stream_connections=False,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    """`llama-server --version` (prints `version: N (COMMIT)` and the compiler, exit 0)."""
    return (spec.binary or SERVER.name, "--version")
