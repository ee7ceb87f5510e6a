"""`[[models]]` and `[runtimes.NAME]`: what is served, how, and where each runtime lives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from node.config.base import _Section, parse_size
from runtimes import NAMES as RUNTIMES
from runtimes import launched

GpuSelector = int | list[int | str]
# A model name becomes a folder name (data_dir/store/models/NAME): no path separator, never `..`;
# Ollama's NAME:TAG and dotted versions (qwen2.5-7b) are fine.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


def check_model_name(name: str) -> str:
    """The name, or ValueError when it holds `..` (the pattern already keeps out separators)."""
    if ".." in name:
        raise ValueError(f"model name {name!r} may not contain '..' (it names a folder in the store)")
    return name


class ModelConfig(_Section):
    # The model name clients send in `model`: letters, digits, `.`, `_`, `:`, `-` (no `/`, no `..`; it names a folder).
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=MODEL_NAME)]
    # Where the bytes come from: hf:ORG/REPO[@REV][#GLOB], ollama:NAME[:TAG], https://...#sha256=HEX, file:PATH[#GLOB] or builtin:NAME[#GLOB]; not for external.
    source: str = ""
    # vllm, sglang, ollama, llamacpp or external.
    runtime: str
    # GPUs per replica: a count, or a list of GPU indices / GPU-... / MIG-... UUIDs; 0 runs on CPU.
    gpus: GpuSelector = 0
    # Worker processes serving this model.
    replicas: Annotated[int, Field(ge=0)] = 1
    # Extra command-line flags for the runtime; they win over the ones the node adds.
    args: list[str] = []
    # Extra environment variables for the worker.
    env: dict[str, str] = {}
    # The OpenAI-compatible base URL of an external model, e.g. http://127.0.0.1:11434/v1 (user:password@ in it is sent as Basic auth).
    url: str | None = None
    # Memory each replica needs per GPU, e.g. "20GiB"; estimated from the weights when unset.
    gpu_memory: str | None = None
    # binpack fills the fullest GPU that fits; spread picks the GPU with the fewest replicas.
    placement: Literal["binpack", "spread"] = "binpack"
    # The context length, reported in /v1/models and used by the context check (default: what the runtime was launched with).
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    # Seconds to become ready before the start counts as failed (default: [runtimes.NAME], else the runtime's own).
    startup_timeout_s: Annotated[float, Field(gt=0)] | None = None
    # Requests running on this model at once, all replicas together.
    max_inflight: Annotated[int, Field(gt=0)] = 64
    # Requests waiting for a slot; beyond this the answer is 429.
    max_queue: Annotated[int, Field(ge=0)] = 256
    # Price in USD per million prompt tokens: the ledger's cost, and what budget_usd charges.
    price_input: Annotated[float, Field(ge=0)] = 0.0
    # Price per million completion tokens.
    price_output: Annotated[float, Field(ge=0)] = 0.0
    # Registry for ollama: sources (default registry.ollama.ai).
    registry: str | None = None
    # Requests per minute passed to LiteLLM for its routing (fleet registration).
    rpm: int | None = None
    # Tokens per minute passed to LiteLLM for its routing.
    tpm: int | None = None
    # LiteLLM deployment priority.
    order: int | None = None
    # LiteLLM tags for tag-based routing.
    tags: list[str] = []
    # Also probe with a real one-token completion every [supervisor] inference_probe_every probes.
    probe_inference: bool = False
    # Seconds the worker may stay silent (before its answer's head, or between pieces of its body) before the request fails with 504.
    read_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 600.0
    # Seconds opening a connection to the worker may take (TLS handshake included).
    connect_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # external only: environment variable holding the server's API key, sent as `Authorization: Bearer`.
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    # Models that take a request this one cannot (overloaded, not ready, worker failed), in order.
    fallbacks: list[str] = []
    # "always": loaded at start, never evicted; "on_demand": loaded by its first request.
    load: Literal["always", "on_demand"] = "always"
    # On-demand models unload after this many seconds without requests (0: never).
    idle_unload_s: Annotated[float, Field(ge=0)] = 900.0
    # Idle through the runtime's sleep mode (vLLM) instead of stopping.
    sleep: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        if v not in RUNTIMES:
            raise ValueError(f"unknown runtime '{v}'; use one of {', '.join(RUNTIMES)}")
        return v

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: GpuSelector) -> GpuSelector:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be a GPU count >= 0 or a list of GPU indices/UUIDs")
        if isinstance(v, list) and any((isinstance(x, int) and x < 0) or (isinstance(x, str) and not x) for x in v):
            raise ValueError("list GPU indices (>= 0) or UUIDs (\"GPU-...\", \"MIG-...\")")
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _gpu_memory(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @model_validator(mode="after")
    def _url_or_source(self) -> ModelConfig:
        if self.api_key_env and self.launched:
            raise ValueError("api_key_env: only runtime 'external' takes an API key; remove it")
        if not self.launched:
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"runtime '{self.runtime}' needs url = \"http://host:port/v1\"")
            userinfo = urlsplit(self.url).netloc.rpartition("@")[0]
            if userinfo and self.api_key_env:
                raise ValueError("url: give the server's credentials either in the url (sent as Basic auth) "
                                 "or as api_key_env (sent as a bearer token), not both")
        elif not self.source:
            raise ValueError("source is required (hf:ORG/REPO, ollama:NAME:TAG, https://...#sha256=..., file:PATH or builtin:NAME)")
        if self.sleep and not self.on_demand:
            raise ValueError("sleep = true applies to models that idle: set load = \"on_demand\" too")
        if self.on_demand and not self.launched:
            raise ValueError(f"the node does not launch {self.runtime} models, so this one cannot be loaded on demand")
        return self

    @property
    def launched(self) -> bool:
        """Whether the node launches this model's workers (an external server it only routes to)."""
        return launched(self.runtime)

    @property
    def on_demand(self) -> bool:
        return self.load == "on_demand"

    @property
    def gpu_count(self) -> int:
        return self.gpus if isinstance(self.gpus, int) else len(self.gpus)

    @property
    def gpu_memory_bytes(self) -> int | None:
        """`gpu_memory` in bytes, when set."""
        return parse_size(self.gpu_memory) if self.gpu_memory else None


class RuntimeSettings(_Section):
    """Where a runtime lives: its own venv's python, a binary path (ollama), or its server (llamacpp)."""

    # The python of the runtime's own virtual environment (vllm, sglang).
    python: Path | None = None
    # The runtime's executable (ollama); a bare name is looked up on PATH.
    binary: Path | None = None
    # The runtime's server executable (llamacpp: llama-server); unset: on PATH, else built from pinned sources and cached.
    server: Path | None = None
    # Seconds to become ready, for every model on this runtime (default: 1200 for vLLM and SGLang, 600 for Ollama, 300 for llama.cpp).
    startup_timeout_s: Annotated[float, Field(gt=0)] | None = None
    # Environment variables for every worker of this runtime.
    env: dict[str, str] = {}
