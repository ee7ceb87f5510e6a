"""SGLang through its server (`python -m sglang.launch_server`).

Flags follow SGLang's "Server Arguments" page (docs.sglang.io): `--model-path PATH
--served-model-name NAME --host --port --tp N`, `--mem-fraction-static F` when
placement shares a GPU, `--context-length`. Its `/health` and `/health_generate`
answer 503 while the server is starting and 200 once a one-token generation went
through (sglang/srt/entrypoints/http_server.py), so readiness is `/health_generate`:
a worker counts as ready only after it really generated.
"""

from __future__ import annotations

from runtimes import LaunchPlan, ModelLayout, Probe, WorkerSpec, flag_value, has_flag, int_or_none, local_plan, python_module_version_argv

NAME = "sglang"
LAYOUT = ModelLayout.HF_FOLDER
DEFAULT_STARTUP_TIMEOUT_S = 20 * 60.0
MODULE = "sglang.launch_server"
# SGLang sizes its running batch from memory when --max-running-requests is unset; the node then sends this many.
DEFAULT_RUNNING_REQUESTS = 64
BASE_ENV = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def plan(spec: WorkerSpec) -> LaunchPlan:
    """The command line, environment and probes for one SGLang replica."""
    if spec.model_path is None:
        raise ValueError("sglang needs a model folder (model_path)")
    argv = [
        spec.python, "-m", MODULE,
        "--model-path", str(spec.model_path),
        "--served-model-name", spec.model,
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    if not has_flag(spec.args, "--tp", "--tp-size", "--tensor-parallel-size"):
        argv += ["--tp", str(max(len(spec.gpu_uuids), 1))]
    if spec.gpu_memory_fraction is not None and not has_flag(spec.args, "--mem-fraction-static"):
        argv += ["--mem-fraction-static", f"{spec.gpu_memory_fraction:g}"]
    if spec.max_model_len and not has_flag(spec.args, "--context-length"):
        argv += ["--context-length", str(spec.max_model_len)]
    if spec.concurrency and not has_flag(spec.args, "--max-running-requests"):
        argv += ["--max-running-requests", str(spec.concurrency)]
    argv += list(spec.args)
    return local_plan(
        spec, argv, {**BASE_ENV, **spec.env},
        health=Probe("/health"),
        ready=Probe("/health_generate"),
        default_startup_timeout_s=DEFAULT_STARTUP_TIMEOUT_S,
        metrics_path="/metrics" if has_flag(spec.args, "--enable-metrics") else None,
        stream_usage=True,
        context_length=int_or_none(flag_value(tuple(argv), "--context-length")),
        concurrency=int_or_none(flag_value(tuple(argv), "--max-running-requests")) or DEFAULT_RUNNING_REQUESTS,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    """Prints the installed sglang version from the runtime's own interpreter."""
    return python_module_version_argv(spec.python, ("sglang",))
