"""`[node]` and `[database]`: the port, data, limits, TLS and logs; where accounts are kept."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from node.config.base import _Section


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
    # Connections one pull opens at once, over every file of every model (INFERNODE_PULL_CONCURRENCY wins; default 8).
    pull_concurrency: Annotated[int, Field(ge=1, le=64)] | None = None
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
    # Failed authentications one client address may make per minute (and at once) before it gets 429 without its
    # credential being looked at (admin API, /v1 and the other client APIs, console sign-in, /metrics); 0: no pacing.
    auth_failures_per_minute: Annotated[int, Field(ge=0, le=1_000_000)] = 20
    # Seconds a TLS client has, from accept, to finish its handshake (a connection counts against the caps meanwhile).
    tls_handshake_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
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
    # The least share of a busy model's service (tokens asked) that batch-priority requests keep while interactive ones wait too.
    batch_min_share: Annotated[float, Field(ge=0, le=1)] = 0.1
    # Seconds a model's interactive traffic keeps batch-priority requests from starting after its last
    # request (batch fills idle capacity; batch_min_share still holds).
    batch_yield_s: Annotated[float, Field(ge=0, le=60)] = 0.5

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
