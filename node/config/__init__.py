"""`appliance.toml`: the node's desired state, loaded and validated with pydantic (one module per group of sections).

Every mistake becomes one `ConfigError` line naming the file, the key and the fix.
Relative paths inside the file resolve against the file's folder.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from node.config.accounts import PlanSettings, QuotaSettings
from node.config.base import GiB, _Section, parse_size
from node.config.batches import BatchesSection
from node.config.models import GpuSelector, ModelConfig, RuntimeSettings
from node.config.node import DatabaseSection, NodeSection
from node.config.ops import AlertsSection, FleetSection, LiteLLMFleet, SupervisorSection
from node.errors import ConfigError
from runtimes import NAMES as RUNTIMES
from runtimes import server_binary

__all__ = ["CONFIG_ENV", "SYSTEM_CONFIG", "GiB", "parse_size", "NodeSection", "DatabaseSection", "GpuSelector",
           "ModelConfig", "RuntimeSettings", "QuotaSettings", "PlanSettings", "LiteLLMFleet", "FleetSection",
           "AlertsSection", "SupervisorSection", "BatchesSection", "Config", "find_config", "parse_config", "load_config"]

CONFIG_ENV = "INFERNODE_CONFIG"
SYSTEM_CONFIG = Path("/etc/infernode/appliance.toml")


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
    # [plans.NAME]: models, limits and budgets that keys and teams take with plan = "NAME".
    plans: dict[str, PlanSettings] = {}
    # [model_groups]: NAME = [model names], used in a plan's models as "group:NAME".
    model_groups: dict[str, list[str]] = {}
    # Registration with a LiteLLM proxy; absent: the node joins no fleet.
    fleet: FleetSection = FleetSection()
    # Signed webhooks: a replica failed, a GPU is hot, a budget passed a threshold.
    alerts: AlertsSection = AlertsSection()
    # Batch jobs: limits of OpenAI's Files and Batches API.
    batches: BatchesSection = BatchesSection()
    # Set by load_config, not read from the file.
    path: Path = Field(default=Path("appliance.toml"), exclude=True)

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, v: dict[str, RuntimeSettings]) -> dict[str, RuntimeSettings]:
        for name, settings in v.items():
            if name not in RUNTIMES:
                raise ValueError(f"unknown runtime '{name}'; use one of {', '.join(RUNTIMES)}")
            if settings.server is not None and server_binary(name) is None:
                raise ValueError(f"@runtimes.{name}.server: {name} has no server executable of its own; "
                                 "remove it (set python or binary instead)")
            if settings.python is not None and server_binary(name) is not None:
                raise ValueError(f"@runtimes.{name}.python: {name} runs its own server executable, not a Python "
                                 "module; remove python (set server = PATH to choose the executable)")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ValueError(f"@models[{i}].name: duplicate model name '{m.name}'; give each [[models]] a unique name")
            seen.add(m.name)
        for i, m in enumerate(self.models):
            for f in m.fallbacks:
                if f not in seen or f == m.name:
                    raise ValueError(f"@models[{i}].fallbacks: '{f}' is not another model of this file; "
                                     "list other [[models]] names")
        for g, members in self.model_groups.items():
            for member in members:
                if member not in seen:
                    raise ValueError(f"@model_groups.{g}: no model named '{member}'; list [[models]] names")
        for name, plan in self.plans.items():
            for ref in plan.models or ():
                if ref.startswith("group:") and ref[6:] not in self.model_groups:
                    raise ValueError(f"@plans.{name}.models: no group '{ref[6:]}'; add it to [model_groups]")
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
            "server": _resolve(base, rs.server) if rs.server and "/" in str(rs.server) else rs.server,
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
