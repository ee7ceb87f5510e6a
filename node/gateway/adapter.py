"""The seam between the gateway's stages and the client APIs it serves.

Each client API's path is a `Route`: pure functions from the client's request to an
OpenAI one and from OpenAI's answer back, a stream translator fed one upstream chunk
at a time, and the API's own error shape. OpenAI's own `/v1` paths are the `OPENAI`
route, which passes bodies through. The stages keep auth, quotas, routing, accounting
and metrics; a Route only reshapes bodies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from node.errors import InvalidRequest, NodeError
from node.supply.modelcard import ModelCard


@dataclass(frozen=True, slots=True)
class Call:
    """What a translator may know of one request."""

    model: str        # the name the client used
    rid: str          # the node's request id
    created: int      # unix seconds
    req: dict[str, Any]  # the client's request, as sent
    started: float = 0.0  # time.perf_counter() when the request arrived (for APIs that report durations)


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model as listing routes (Ollama's /api/tags, /api/ps, /api/show) describe it."""

    name: str
    created: int
    context_len: int | None
    loaded: bool
    format: str = ""        # the weights' file format ("gguf", "safetensors"), as its runtime's adapter says
    card: ModelCard | None = None  # what its locked files say it is (size, digest, family, kind); None: no files


class StreamTranslator(Protocol):
    """Turns an OpenAI chunk stream into another API's stream, one chunk at a time."""

    def feed(self, chunk: dict[str, Any]) -> bytes: ...

    def finish(self, prompt_tokens: int, completion_tokens: int) -> bytes: ...

    def fail(self, err: NodeError) -> bytes: ...


ErrorShape = Callable[[NodeError, str], tuple[int, bytes]]


@dataclass(frozen=True)
class Route:
    """One translated path."""

    api: str                                   # recorded in the ledger: "anthropic", "responses", "ollama"
    error: ErrorShape                          # (status, body) of an error in this API's shape
    credential: Callable[[Any], bytes | None]  # the key sent with a request (httpd.Request)
    # Upstream routes: body -> (OpenAI endpoint "chat"|"completions"|"embeddings", OpenAI request).
    to_openai: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]] | None = None
    from_openai: Callable[[dict[str, Any], Call], bytes] | None = None
    streamer: Callable[[Call], StreamTranslator] | None = None
    # Local routes (no worker call): (models the key may see, parsed body or None) -> body.
    local: Callable[[list[ModelView], dict[str, Any] | None], bytes] | None = None
    method: str = "POST"
    content_type: bytes = b"application/json"
    stream_type: bytes = b"text/event-stream"
    native: str | None = None                  # this API's name for runtimes that serve it themselves
    native_path: str = ""                      # its path under the runtime's /v1
    prompt_only: bool = False                  # counts tokens, generates nothing (completion not charged)
    passthrough: bool = False                  # OpenAI's own API: bodies go both ways unchanged


def bearer(req: Any) -> bytes | None:
    """The key from `Authorization: Bearer <key>`."""
    auth = req.header(b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return None


def _openai_error(err: NodeError, rid: str) -> tuple[int, bytes]:
    return err.status, err.body()


# OpenAI's /v1 paths: the worker speaks the API already, so bodies pass through (node/gateway/relay.py).
def _openai_credential(req: Any) -> bytes | None:
    """A bearer token; on the model routes also the `x-api-key` the anthropic SDK sends (models.retrieve)."""
    token = bearer(req)
    if token is None and (req.path == b"/v1/models" or req.path.startswith(b"/v1/models/")):
        key = req.header(b"x-api-key")
        return key.strip() if key else None
    return token


OPENAI = Route(api="openai", error=_openai_error, credential=_openai_credential, passthrough=True)


def sse_chunks(out: bytes) -> list[dict[str, Any]]:
    """The JSON objects of whole `data:` events (without `[DONE]`), in order."""
    chunks = []
    for event in out.split(b"\n\n"):
        at = event.find(b"data:")
        if at < 0:
            continue
        data = event[at + 5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if isinstance(obj, dict):
            chunks.append(obj)
    return chunks


def expect(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False,
           what: str = "") -> Any:
    """body[name] when of the kind wanted (bools are not numbers); a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required", param=name)
        return None
    numeric = kind in (int, float) or (isinstance(kind, tuple) and (int in kind or float in kind))
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        raise InvalidRequest(f"'{name}' must be {what or _kind_name(kind)}", param=name)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
             dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def finish_reason(chunk: dict[str, Any]) -> str | None:
    """The first choice's finish_reason of a chat or completion chunk."""
    choices = chunk.get("choices")
    if choices and isinstance(choices[0], dict):
        return choices[0].get("finish_reason")
    return None
