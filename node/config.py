"""`appliance.toml`: the node's desired state, loaded and validated with pydantic.

Every mistake becomes one `ConfigError` line naming the file, the key and the fix.
Relative paths inside the file resolve against the file's folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from node.errors import ConfigError
from runtimes import NAMES as RUNTIMES
from runtimes import launched

CONFIG_ENV = "INFERNODE_CONFIG"
SYSTEM_CONFIG = Path("/etc/infernode/appliance.toml")
GiB = 1024 ** 3
_UNITS = {"": None, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2,
          "gi": GiB, "gib": GiB, "ti": 1024 ** 4, "tib": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in "20GiB", "20 GB", "512MiB" (GiB/MiB are powers of 2, GB/MB of 10)."""
    m = _SIZE_RE.match(text)
    unit = _UNITS.get(m.group(2).lower(), None) if m else None
    if m is None or unit is None:
        raise ValueError(f"'{text}' is not a memory size; write e.g. \"20GiB\" or \"512MiB\"")
    return int(float(m.group(1)) * unit)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    # This node's name in logs, metrics, alerts and fleet registrations (default: the host name).
    name: str = Field(default_factory=socket.gethostname)
    # HOST:PORT of the one port serving /v1, /admin, /metrics and the health routes.
    listen: str = "0.0.0.0:8080"
    # The store, the SQLite database, worker logs and run state.
    data_dir: Path = Path("/var/lib/infernode")
    # Environment variable holding the admin key.
    admin_key_env: str = "INFERNODE_ADMIN_KEY"
    # File holding the admin key when the variable is unset (default: data_dir/admin.key, generated on first start).
    admin_key_file: Path | None = None
    # Pull what models.lock pins before launching, when the store lacks it.
    pull_on_start: bool = True
    # Seconds SIGTERM waits for in-flight requests before stopping workers.
    drain_grace_s: float = 30.0
    # Seconds a worker outlives a vanished node, waiting to be adopted by its successor.
    adopt_grace_s: float = 30.0
    # Largest request body accepted; larger ones get 413.
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 4 * 1024 * 1024
    # Open client connections at most; past it a new one gets a 503 and is closed.
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    # Open connections from one client address at most; past it a new one gets a 503 and is closed.
    max_connections_per_ip: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    # Seconds a whole request (head and body) has to arrive in, from its first byte (408 after).
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Seconds an idle keep-alive connection stays open.
    keep_alive_s: Annotated[float, Field(gt=0, le=3600)] = 75.0
    # Seconds a client may read nothing of its answer before it is dropped (its request cancelled).
    write_stall_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # HTTPS on the node's port: the certificate chain, a PEM file (`infernode tls selfsigned` writes one).
    tls_cert: Path | None = None
    # The certificate's private key, an unencrypted PEM file (may be the same file as tls_cert).
    tls_key: Path | None = None
    # PEM CA certificates: clients must present a certificate one of them signed (mTLS).
    tls_client_ca: Path | None = None
    # Environment variable holding a token; when set, /metrics needs `Authorization: Bearer <token>`.
    metrics_token_env: str | None = None
    # Log lines as JSON, as short text, or auto: JSON unless stdout is a terminal.
    log_format: Literal["auto", "json", "text"] = "auto"
    # Log each request's prompt (up to 8 KiB, secrets masked) for debugging; completions are never logged.
    log_prompts: bool = False
    # One JSON line per /v1 request (request id, model, key id, status, latency); never the body.
    access_log: bool = True
    # Models loaded at once (always and on-demand ones together); unset: no limit but GPU memory.
    max_loaded_models: Annotated[int, Field(ge=1)] | None = None
    # Seconds a load (or wake) of an on-demand model may take before it counts as failed.
    load_timeout_s: Annotated[float, Field(gt=0)] = 600.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not (0 < int(port) < 65536):
            raise ValueError(f"'{v}' is not HOST:PORT; write e.g. \"0.0.0.0:8080\"")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> NodeSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("@node.tls_cert: tls_cert and tls_key go together; set both (PEM files) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("@node.tls_client_ca: client certificates need TLS; set tls_cert and tls_key too")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class DatabaseSection(_Section):
    # postgresql://USER@HOST/DB for keys, teams and the ledger (default: SQLite in data_dir/infernode.db).
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("must start with postgresql:// (or sqlite:///PATH)")
        return v


GpuSelector = int | list[int | str]


class ModelConfig(_Section):
    # The model name clients send in `model`.
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]
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
    # Price in your currency per million prompt tokens, reported by usage.
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
    # "always": loaded at start, never evicted; "on_demand": loaded by its first request.
    load: Literal["always", "on_demand"] = "always"
    # On-demand models unload after this many seconds without requests (0: never).
    idle_unload_s: Annotated[float, Field(ge=0)] = 900.0
    # Idle through the runtime's sleep mode (vLLM) instead of stopping.
    sleep: bool = False

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
    """Where a runtime lives: its own venv's python, or a binary path (ollama)."""

    # The python of the runtime's own virtual environment (vllm, sglang, llamacpp).
    python: Path | None = None
    # The runtime's executable (ollama); a bare name is looked up on PATH.
    binary: Path | None = None
    # Seconds to become ready, for every model on this runtime (default: 1200 for vLLM and SGLang, 600 for Ollama, 300 for llama.cpp).
    startup_timeout_s: Annotated[float, Field(gt=0)] | None = None
    # Environment variables for every worker of this runtime.
    env: dict[str, str] = {}


class QuotaSettings(_Section):
    # Requests per minute (sliding window).
    rpm: Annotated[int, Field(ge=0)] | None = None
    # Prompt + completion tokens per minute.
    tpm: Annotated[int, Field(ge=0)] | None = None
    # Requests in flight at once.
    max_parallel: Annotated[int, Field(ge=0)] | None = None
    # Tokens per budget period.
    budget_tokens: Annotated[int, Field(ge=0)] | None = None
    # The budget's period, in UTC.
    budget_period: Literal["day", "month"] = "day"
    # Requests per minute per end user (the request's `user` field) under one key, e.g. a fleet key.
    user_rpm: Annotated[int, Field(ge=0)] | None = None
    # Tokens per minute per end user.
    user_tpm: Annotated[int, Field(ge=0)] | None = None


class LiteLLMFleet(_Section):
    # The LiteLLM proxy, e.g. http://router:4000.
    url: str
    # Environment variable holding the proxy's master key.
    master_key_env: str = "LITELLM_MASTER_KEY"
    # File holding the master key when the variable is unset (relative to appliance.toml).
    master_key_file: Path | None = None
    # How the proxy reaches this node, e.g. http://gpu-box-01:8080 (/v1 is added).
    advertise_url: str
    # Register the ready models on start; false: only on `infernode fleet register`.
    register_on_start: bool = True
    # Requests per minute of the node key the proxy uses.
    key_rpm: int | None = None
    # Tokens per minute of the node key the proxy uses.
    key_tpm: int | None = None


class FleetSection(_Section):
    # The LiteLLM proxy this node registers its ready models with.
    litellm: LiteLLMFleet | None = None


class AlertsSection(_Section):
    # URLs each alert is POSTed to.
    webhook_urls: list[str] = []
    # Environment variable holding the HMAC signing secret.
    secret_env: str = "INFERNODE_ALERT_SECRET"
    # File holding the signing secret when the variable is unset.
    secret_file: Path | None = None
    # Alert when a GPU reaches this temperature (re-armed 5 °C below).
    gpu_temperature_c: float = 85.0
    # Alert when a key or team passes these shares of its token budget.
    budget_thresholds: list[float] = [0.8, 1.0]
    # Seconds between budget checks against the ledger.
    budget_check_s: Annotated[float, Field(gt=0)] = 30.0


class SupervisorSection(_Section):
    """How workers are kept alive; the defaults suit real model loads."""

    # Seconds before the first restart; doubled after each failure.
    backoff_initial_s: Annotated[float, Field(gt=0)] = 1.0
    # The longest wait between restarts.
    backoff_max_s: Annotated[float, Field(gt=0)] = 300.0
    # A replica ready this long has its backoff and crash count reset.
    stable_after_s: Annotated[float, Field(gt=0)] = 60.0
    # This many failed starts or crashes in a row end in `failed`.
    crash_loop_limit: Annotated[int, Field(ge=1)] = 5
    # Seconds between liveness probes.
    probe_interval_s: Annotated[float, Field(gt=0)] = 5.0
    # Seconds one probe may take.
    probe_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # Consecutive failed liveness probes before `unhealthy`; twice this restarts the replica.
    probe_failures: Annotated[int, Field(ge=1)] = 3
    # Seconds between SIGTERM and SIGKILL when stopping a worker.
    stop_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    # Models with probe_inference = true get a real one-token completion every this many probes.
    inference_probe_every: Annotated[int, Field(ge=1)] = 6
    # Seconds the inference probe may take.
    inference_probe_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # Size at which a worker's log in data_dir/logs is rotated.
    log_max_bytes: Annotated[int, Field(gt=0)] = 20 * 1024 * 1024
    # Rotated worker logs kept.
    log_backups: Annotated[int, Field(ge=0)] = 3


class Config(_Section):
    """The whole `appliance.toml`, plus where it came from."""

    # The node itself: its port, data, admin key and logs.
    node: NodeSection = NodeSection()
    supervisor: SupervisorSection = SupervisorSection()
    # Where keys, teams and the usage ledger are kept.
    database: DatabaseSection = DatabaseSection()
    # One entry per model served; `infernode lock` pins each source in models.lock.
    models: list[ModelConfig] = []
    # Settings per runtime, NAME being vllm, sglang, ollama or llamacpp.
    runtimes: dict[str, RuntimeSettings] = {}
    # [quotas.default]: the limits a new key gets for any it leaves out (other names are not used).
    quotas: dict[str, QuotaSettings] = {}
    # Registration with a LiteLLM proxy; absent: the node joins no fleet.
    fleet: FleetSection = FleetSection()
    # Signed webhooks: a replica failed, a GPU is hot, a budget passed a threshold.
    alerts: AlertsSection = AlertsSection()
    # Set by load_config, not read from the file.
    path: Path = Field(default=Path("appliance.toml"), exclude=True)

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, v: dict[str, RuntimeSettings]) -> dict[str, RuntimeSettings]:
        for name in v:
            if name not in RUNTIMES:
                raise ValueError(f"unknown runtime '{name}'; use one of {', '.join(RUNTIMES)}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"@models[{i}].name: duplicate model name '{m.name}'; give each [[models]] a unique name")
            seen.add(m.name)
        return self

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def lock_path(self) -> Path:
        return self.base_dir / "models.lock"

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def default_quota(self) -> QuotaSettings:
        return self.quotas.get("default", QuotaSettings())

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def runtime_settings(self, runtime: str) -> RuntimeSettings:
        return self.runtimes.get(runtime, RuntimeSettings())

    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'infernode.db'}"

    def resolve(self, p: Path) -> Path:
        """A path from the file: relative ones are relative to the file's folder."""
        return _resolve(self.base_dir, p)

    def secret(self, env: str, file: Path | None) -> str | None:
        """A secret from the environment variable `env`, else from `file` (relative to this file's folder)."""
        value = os.environ.get(env)
        if value:
            return value.strip()
        if file is not None:
            with contextlib.suppress(OSError):
                return self.resolve(file).read_text().strip() or None
        return None

    @property
    def admin_key_path(self) -> Path:
        """Where the admin key is kept when its variable is unset: admin_key_file, else data_dir/admin.key."""
        return self.node.admin_key_file or self.data_dir / "admin.key"

    def admin_key(self) -> str | None:
        """The admin key: from the variable named by admin_key_env, else its file."""
        return self.secret(self.node.admin_key_env, self.admin_key_path)


def find_config(explicit: str | os.PathLike | None = None) -> Path:
    """The config path: --config, else $INFERNODE_CONFIG, else ./appliance.toml, else /etc."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    local = Path("appliance.toml")
    if local.exists():
        return local
    return SYSTEM_CONFIG


def _key_path(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif item in ("function-after", "int", "list[union[int,str]]") or "[" in str(item):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def _fix_for(err: ErrorDetails) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "remove it or check its spelling"
    if kind == "missing":
        return "add it"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a {kind.split('_')[0]}"
    return ""


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate a parsed TOML document; raise ConfigError naming the first bad key."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        key = _key_path(err["loc"], raw)
        if msg.startswith("@"):  # the validator named the key itself
            key, _, msg = msg[1:].partition(": ")
        if err["type"] == "extra_forbidden":
            return _raise(path, key, "unknown key", _fix_for(err))
        if err["type"] == "missing":
            return _raise(path, key, "required key is missing", _fix_for(err))
        if err["type"] == "literal_error":
            return _raise(path, key, msg)
        if err["type"] not in ("value_error", "assertion_error"):
            got = err.get("input")
            return _raise(path, key, f"{msg.lower()} (got {got!r})")
        return _raise(path, key, msg)
    base = path.parent
    node = cfg.node
    updates: dict[str, Any] = {"data_dir": _resolve(base, node.data_dir)}
    for name in ("admin_key_file", "tls_cert", "tls_key", "tls_client_ca"):
        if getattr(node, name):
            updates[name] = _resolve(base, getattr(node, name))
    runtimes = {
        name: rs.model_copy(update={
            "python": _resolve(base, rs.python) if rs.python else None,
            "binary": _resolve(base, rs.binary) if rs.binary and "/" in str(rs.binary) else rs.binary,
        })
        for name, rs in cfg.runtimes.items()
    }
    return cfg.model_copy(update={"node": node.model_copy(update=updates), "runtimes": runtimes, "path": path})


def _resolve(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _raise(path: Path, key: str, problem: str, fix: str = "") -> Config:
    raise ConfigError(str(path), key, problem, fix)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate `appliance.toml` (when path is None: $INFERNODE_CONFIG, ./appliance.toml, then /etc/infernode)."""
    p = find_config(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(str(p), "", "no such file", "run `infernode init` or pass --config PATH") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "", f"not valid TOML ({exc})", "fix the syntax at that line") from None
    return parse_config(raw, p.absolute())
