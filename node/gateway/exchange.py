"""What the request path's stages hand each other: a model's settings, one request's record, the hand-offs.

admit → `Admitted` → schedule + call → `Upstream` → relay → settle. The hand-offs are
frozen: a stage reads what the one before decided and never changes it. `Exchange` is the
request's record (status, tokens, the model that served it), filled in as it goes and
read once, by settle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from node.errors import NodeError, UpstreamError

if TYPE_CHECKING:
    from node.accounts.keys import KeyRecord
    from node.accounts.quotas import Admission
    from node.gateway.adapter import Call, Route
    from node.gateway.upstream import Response
    from node.workers.router import WorkerView

JSON_CT = [(b"content-type", b"application/json")]


NO_RETRY = [(b"x-should-retry", b"false")]  # the official SDKs' word for "do not send this again"


def error_headers(err: NodeError, rid: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of an error answer: JSON, the request id, and the error's own (Retry-After, x-ratelimit-*)."""
    out = JSON_CT + [(b"x-request-id", rid)] + [(k.encode(), v.encode()) for k, v in err.headers.items()]
    return out if err.retryable else out + NO_RETRY


class WorkerUnreachable(UpstreamError):
    """The worker failed before any byte reached the client: another model may take the request."""


@dataclass
class ModelInfo:
    """What the gateway knows about a configured model."""

    name: str
    max_model_len: int | None = None
    price_input: float = 0.0      # per million tokens
    price_output: float = 0.0
    max_inflight: int = 64
    max_queue: int = 256
    read_timeout_s: float = 600.0   # the worker's silence before a request fails (504)
    connect_timeout_s: float = 5.0
    on_demand: bool = False       # loaded by requests: a request waits for its load
    fallbacks: tuple[str, ...] = ()   # models that take what this one cannot, in order
    queue_timeout_s: float = 30.0     # a request's wait for a slot before 503
    max_queued: int | None = None     # requests one tenant may have waiting
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, m: Any) -> ModelInfo:
        """From a `[[models]]` entry (node/config/models.py's ModelConfig)."""
        return cls(name=m.name, max_model_len=m.max_model_len, price_input=m.price_input,
                   price_output=m.price_output, max_inflight=m.max_inflight, max_queue=m.max_queue,
                   read_timeout_s=m.read_timeout_s, connect_timeout_s=m.connect_timeout_s,
                   on_demand=m.on_demand, fallbacks=tuple(m.fallbacks),
                   queue_timeout_s=m.queue_timeout_s, max_queued=m.max_queued)


@dataclass(slots=True)
class Exchange:
    """One request's record, filled in by the stages and settled once."""

    rid: str
    model: str
    endpoint: str
    key_id: str | None
    team: str | None
    user: str | None
    started: float
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    api: str = "openai"
    client_rid: str | None = None
    slot: Any = None              # its place on a replica (node/gateway/scheduler.py)
    lower: bool = False           # x-infernode-priority: batch
    preempt: Any = None           # a batch line's stop (node/gateway/inprocess.py), given to its slot


@dataclass(frozen=True, slots=True)
class Admitted:
    """admit's hand-off: a request the node will try to serve, its body already in OpenAI's shape."""

    key: KeyRecord
    adm: Admission
    ex: Exchange
    info: ModelInfo        # the model asked for (a fallback may serve it)
    body: dict[str, Any]   # the OpenAI request (or a natively served API's, passed through)
    raw: bytes             # the body as received (sent unchanged when nothing in it changes)
    path: bytes            # the /v1 path the worker gets
    route: Route           # the client's API (OPENAI for /v1 passthrough)
    call: Call | None      # set when the route translates: what its translator may know
    ridb: bytes            # the request id the client sees


@dataclass(frozen=True, slots=True)
class Upstream:
    """call's hand-off: the worker's answer (head read, body not yet) and how to relay it."""

    resp: Response
    target: WorkerView
    worker_usage: bool     # the worker's streams carry usage (else content events are counted)
    wants_usage: bool      # the client asked for a usage chunk itself
    native: bool           # an API the runtime serves itself, passed through untranslated
