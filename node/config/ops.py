"""`[fleet]`, `[alerts]` and `[supervisor]`: how the node joins a fleet, warns, and keeps workers alive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from node.config.base import _Section


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
    # CPU niceness of worker processes (0-19; 0: the node's own): the node's wake-ups go first when a worker saturates the CPU.
    worker_nice: Annotated[int, Field(ge=0, le=19)] = 5
