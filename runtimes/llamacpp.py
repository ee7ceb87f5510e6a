"""llama.cpp through llama-cpp-python's OpenAI server (`python -m llama_cpp.server`).

Flags follow llama-cpp-python's server settings (`--model`, `--model_alias`,
`--host`, `--port`, `--n_ctx`, `--n_gpu_layers`, `--interrupt_requests`). Its
`/health` is 404 in 0.3.x, so readiness is `/v1/models` listing the alias. Its
streams carry no usage chunk, so the server is started through a small shim
(runtimes/llamacpp_usage.py, run by the runtime's own interpreter) that adds the
exact usage chunk at the end of every stream, counted inside the server as its
non-streamed answers count.

The server runs one generation at a time behind a lock that every model route takes
(`/v1/models` included), and by default a request waiting for that lock interrupts
the running stream. So the node launches it with `--interrupt_requests False`
(concurrent requests queue instead of cutting each other short) and probes liveness
on `/docs`, a static page that does not wait for the lock, so a long generation
never looks like a dead worker.

Its OpenAI dialect (`DIALECT`, llama-cpp-python 0.3.x): an assistant turn with
`tool_calls` must carry string content (`null` is a 422); `max_completion_tokens` is
ignored (`max_tokens` is honoured); `response_format` takes `json_object` with a
`schema` (grammar-enforced) but not `json_schema`; `n` is ignored (one choice).
"""

from __future__ import annotations

from pathlib import Path

from runtimes import (
    Dialect,
    LaunchPlan,
    ModelLayout,
    Probe,
    SchemaOutput,
    WorkerSpec,
    flag_value,
    has_flag,
    int_or_none,
    local_plan,
    python_module_version_argv,
)

NAME = "llamacpp"
LAYOUT = ModelLayout.GGUF_FILE
DEFAULT_STARTUP_TIMEOUT_S = 300.0
DEFAULT_N_CTX = 2048
USAGE_SHIM = str(Path(__file__).with_name("llamacpp_usage.py"))
DIALECT = Dialect(tool_turn_content="", max_completion_tokens=False, schema_output=SchemaOutput.JSON_OBJECT_SCHEMA,
                  ignores={"n": 1})


def plan(spec: WorkerSpec) -> LaunchPlan:
    """The command line, environment and probes for one llama.cpp replica."""
    if spec.model_path is None:
        raise ValueError("llamacpp needs a GGUF file (model_path)")
    argv = [
        spec.python, USAGE_SHIM, "-m", "llama_cpp.server",
        "--model", str(spec.model_path),
        "--model_alias", spec.model,
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    if not has_flag(spec.args, "--n_ctx"):
        argv += ["--n_ctx", str(spec.max_model_len or DEFAULT_N_CTX)]
    if not has_flag(spec.args, "--interrupt_requests"):
        argv += ["--interrupt_requests", "False"]
    if spec.gpu_uuids and not has_flag(spec.args, "--n_gpu_layers"):
        argv += ["--n_gpu_layers", "-1"]
    argv += list(spec.args)
    return local_plan(
        spec, argv, spec.env,
        health=Probe("/docs"),
        ready=Probe("/v1/models", expect_model=spec.model),
        default_startup_timeout_s=DEFAULT_STARTUP_TIMEOUT_S,
        stream_usage=True,  # the shim's usage chunk
        context_length=int_or_none(flag_value(tuple(argv), "--n_ctx")),
        # llama-cpp-python answers 400 to an x-request-id that is not a UUID.
        uuid_request_ids=True,
        cannot={} if has_flag(spec.args, "--embedding") else {
            "embeddings": "llama.cpp makes embeddings only when started with --embedding; add "
                          "\"--embedding\" to this model's args (and use an embedding model)"},
        dialect=DIALECT,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    return python_module_version_argv(spec.python, ("llama-cpp-python", "llama_cpp_python"))

