"""Ollama (`ollama serve`), one server per replica on its own loopback port.

Follows Ollama's docs (docs.ollama.com: FAQ "How do I configure Ollama server?",
API reference): the server takes no flags; `OLLAMA_HOST=127.0.0.1:PORT` sets where it
listens and `OLLAMA_MODELS` where it finds `manifests/` and `blobs/` (the store's
Ollama tree). Health is `GET /api/version`; the model is listed by `/v1/models` once
the server has read its manifests, then a warm-up loads it with `keep_alive=-1`
through the official `ollama` client (the worker runs it), and traffic goes to its
OpenAI-compatible `/v1`. Ollama knows the model as NAME:TAG, which `upstream_model`
carries when it differs from the served name.
"""

from __future__ import annotations

from runtimes import LaunchPlan, Probe, WorkerSpec, Warmup

NAME = "ollama"
DEFAULT_STARTUP_TIMEOUT_S = 10 * 60.0
DEFAULT_REGISTRY = "registry.ollama.ai"
# Requests through /v1 carry no keep_alive: without this default Ollama would unload
# the model after 5 idle minutes. NOPRUNE keeps it from deleting blobs it did not pull.
BASE_ENV = {"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_NOPRUNE": "1"}


def ollama_name(source: str) -> str:
    """The NAME:TAG Ollama lists for an `ollama:NAME[:TAG]` source (tag defaults to latest)."""
    ref = source.removeprefix("ollama:")
    if not ref or ref == source:
        raise ValueError(f"ollama needs an ollama:NAME[:TAG] source, not {source!r}")
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    name = name.removeprefix(DEFAULT_REGISTRY + "/").removeprefix("library/")
    return f"{name}:{tag or 'latest'}"


def plan(spec: WorkerSpec) -> LaunchPlan:
    """The command line, environment, probes and model warm-up for one Ollama replica."""
    if spec.model_path is None:
        raise ValueError("ollama needs the store's Ollama tree (model_path)")
    if spec.args:
        raise ValueError("`ollama serve` takes no arguments; set OLLAMA_* variables in the model's env instead")
    upstream = ollama_name(spec.source)
    env = {
        **BASE_ENV, **spec.env,
        "OLLAMA_HOST": f"{spec.host}:{spec.port}",
        "OLLAMA_MODELS": str(spec.model_path),
        "CUDA_VISIBLE_DEVICES": ",".join(spec.gpu_uuids),
    }
    if spec.max_model_len and "OLLAMA_CONTEXT_LENGTH" not in env:
        env["OLLAMA_CONTEXT_LENGTH"] = str(spec.max_model_len)
    root = f"http://{spec.host}:{spec.port}"
    return LaunchPlan(
        argv=(spec.binary or "ollama", "serve"),
        env=env,
        root_url=root,
        openai_base=root + "/v1",
        health=Probe("/api/version"),
        ready=Probe("/v1/models", expect_model=upstream),
        startup_timeout_s=spec.startup_timeout_s or DEFAULT_STARTUP_TIMEOUT_S,
        warmup=(Warmup(kind="ollama_load", model=upstream),),
        stream_usage=True,
        upstream_model=upstream if upstream != spec.model else None,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    """`ollama --version` (without a server it warns and prints the client version, exit 0)."""
    return (spec.binary or "ollama", "--version")
