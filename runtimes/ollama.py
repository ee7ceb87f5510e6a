"""Ollama (`ollama serve`), one server per replica on its own loopback port.

Follows Ollama's docs (docs.ollama.com: FAQ "How do I configure Ollama server?",
API reference): the server takes no flags; `OLLAMA_HOST=127.0.0.1:PORT` sets where it
listens and `OLLAMA_MODELS` where it finds `manifests/` and `blobs/` (the store's
Ollama tree). Health is `GET /api/version`; the model is listed by `/v1/models` once
the server has read its manifests, then a warm-up loads it with `keep_alive=-1`
(`POST /api/generate` with an empty prompt, which the worker sends), and traffic goes to its
OpenAI-compatible `/v1`. Ollama knows the model as NAME:TAG, which `upstream_model`
carries when it differs from the served name.

Its OpenAI dialect (`DIALECT`, Ollama's docs/openai.md): `max_tokens` but not
`max_completion_tokens`, and one choice (`n` is not supported).
"""

from __future__ import annotations

from runtimes import Dialect, LaunchPlan, ModelLayout, Probe, Warmup, WorkerSpec, int_or_none, local_plan

NAME = "ollama"
LAYOUT = ModelLayout.OLLAMA_TREE
DEFAULT_STARTUP_TIMEOUT_S = 10 * 60.0
DEFAULT_REGISTRY = "registry.ollama.ai"
# Requests through /v1 carry no keep_alive: without this default Ollama would unload
# the model after 5 idle minutes. NOPRUNE keeps it from deleting blobs it did not pull.
BASE_ENV = {"OLLAMA_KEEP_ALIVE": "-1", "OLLAMA_NOPRUNE": "1"}
DIALECT = Dialect(max_completion_tokens=False, ignores={"n": 1})


def ollama_name(source: str) -> str:
    """The name Ollama lists for an `ollama:[HOST/][NAMESPACE/]NAME[:TAG]` source.

    As Ollama shortens names: the default registry and the `library` namespace are
    dropped ("qwen2.5:0.5b"); a model from another registry keeps its host and namespace
    ("127.0.0.1:5000/library/tiny:q4"); the tag defaults to `latest`.
    """
    ref = source.removeprefix("ollama:")
    if not ref or ref == source:
        raise ValueError(f"ollama needs an ollama:NAME[:TAG] source, not {source!r}")
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    name, tag = (ref[:colon], ref[colon + 1:]) if colon > slash else (ref, "latest")
    parts = name.split("/")
    if len(parts) == 3 and parts[0] != DEFAULT_REGISTRY:
        return f"{name}:{tag or 'latest'}"
    parts = parts[1:] if len(parts) == 3 else parts
    if len(parts) == 2 and parts[0] == "library":
        parts = parts[1:]
    return f"{'/'.join(parts)}:{tag or 'latest'}"


def with_registry(source: str, registry: str | None) -> str:
    """The source as Ollama names the model when it comes from `registry` (its host kept, no scheme)."""
    ref = source.removeprefix("ollama:")
    if not registry or ref == source:
        return source
    name, _, tag = ref.partition(":")
    repository = name if "/" in name else f"library/{name}"
    host = registry.split("://", 1)[-1].rstrip("/")
    return f"ollama:{host}/{repository}:{tag or 'latest'}"


def plan(spec: WorkerSpec) -> LaunchPlan:
    """The command line, environment, probes and model warm-up for one Ollama replica."""
    if spec.model_path is None:
        raise ValueError("ollama needs the store's Ollama tree (model_path)")
    if spec.args:
        raise ValueError("`ollama serve` takes no arguments; set OLLAMA_* variables in the model's env instead")
    upstream = ollama_name(with_registry(spec.source, spec.registry))
    env = {
        **BASE_ENV, **spec.env,
        "OLLAMA_HOST": f"{spec.host}:{spec.port}",
        "OLLAMA_MODELS": str(spec.model_path),
    }
    if spec.max_model_len and "OLLAMA_CONTEXT_LENGTH" not in env:
        env["OLLAMA_CONTEXT_LENGTH"] = str(spec.max_model_len)
    return local_plan(
        spec, (spec.binary or "ollama", "serve"), env,
        health=Probe("/api/version"),
        ready=Probe("/v1/models", expect_model=upstream),
        default_startup_timeout_s=DEFAULT_STARTUP_TIMEOUT_S,
        # An empty prompt loads the model; keep_alive=-1 pins it in memory for good.
        warmup=(Warmup("/api/generate", {"model": upstream, "prompt": "", "keep_alive": -1, "stream": False}),),
        stream_usage=True,
        upstream_model=upstream if upstream != spec.model else None,
        context_length=int_or_none(env.get("OLLAMA_CONTEXT_LENGTH")),
        dialect=DIALECT,
    )


def version_argv(spec: WorkerSpec) -> tuple[str, ...]:
    """`ollama --version` (without a server it warns and prints the client version, exit 0)."""
    return (spec.binary or "ollama", "--version")
