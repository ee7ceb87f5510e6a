"""A client's request body made into what the gateway works on: decoded, checked and (for large ones) translated.

Small bodies are read on the event loop: the hot path pays one JSON decode, a byte
search for surrogate escapes and a lookup per top-level field (node/gateway/fields.py).
Bodies of OFFLOAD_BYTES or more are read by a small, bounded pool of threads, and so is
their translation when another API's route needs one: the loop keeps serving other
clients while a 4 MiB body is decoded and walked. (The JSON decoder itself holds the
GIL while it runs, about 10 ms per MiB; the Python-level walks and translations give
the loop its turn every few milliseconds.)

What is refused here, in the client's API shape: bytes that are not UTF-8 JSON, NaN
and ±Infinity (`NaN`, `1e400`), fractions of more than NUMBER_CHARS characters (integers
are capped by Python at 4,300 digits), a lone surrogate anywhere (`"\\ud800"` is valid JSON,
but not text: no store, log or worker can take it), and fields out of shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from node.errors import InvalidRequest, NodeError
from node.gateway import fields
from node.gateway.adapter import Route

OFFLOAD_BYTES = 256 << 10   # bodies from this size on are decoded and translated off the event loop
WORKERS = 2                 # threads for large bodies (the others wait their turn)
PATH_PART_CHARS = 64        # a key named in an error message is cut to this
NUMBER_CHARS = 100          # a JSON number with a fraction or exponent: float() is quadratic in its digits

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    if len(text) > NUMBER_CHARS:
        raise ValueError(f"a number of more than {NUMBER_CHARS} characters")
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_finite)


def parse(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object of finite numbers, or a 400."""
    try:
        # RFC 8259: JSON on the wire is UTF-8; decoding it first skips json's encoding sniffing.
        req = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not UTF-8 JSON") from None
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(req, dict):
        raise InvalidRequest("request body must be a JSON object")
    return req


def lone_surrogate(body: Any) -> str | None:
    """The path (`messages.0.content`) of the first string or key holding a lone surrogate, or None.

    Linear: each node is visited once and paths are parent links, spelled out only for the one found.
    """
    stack: list[tuple[Any, tuple | None]] = [(body, None)]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, str):
            if not _utf8(obj):
                return _spell(path)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if not _utf8(k):
                    return _spell((k, path))
                stack.append((v, (k, path)))
        elif isinstance(obj, list):
            stack.extend((v, (i, path)) for i, v in enumerate(obj))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _spell(path: tuple | None) -> str:
    parts = []
    while path is not None:
        part, path = path
        parts.append(str(part)[:PATH_PART_CHARS].encode("utf-8", "backslashreplace").decode())
    return ".".join(reversed(parts)) or "body"


def decode(raw: bytes, api: str) -> dict[str, Any]:
    """Parse a body and check it: text only, fields in shape (400s naming the field)."""
    body = parse(raw)
    # A lone surrogate can only arrive as a \\uD8xx-\\uDFxx escape (UTF-8 cannot carry one): most bodies have none.
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # all in C; the walk only names the field
        except RecursionError:
            raise InvalidRequest("request body is nested too deeply") from None
        except UnicodeEncodeError:
            where = lone_surrogate(body) or "body"
            raise InvalidRequest(f"'{where}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                                 "not text", param=where) from None
    fields.check(body, api)
    return body


class _Translated:
    """A route's to_openai whose answer (or refusal) was worked out off the loop."""

    __slots__ = ("result",)

    def __init__(self, result: tuple[str, dict[str, Any]] | NodeError) -> None:
        self.result = result

    def __call__(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if isinstance(self.result, NodeError):
            raise self.result
        return self.result


def _read_large(raw: bytes, api: str, route: Route) -> tuple[dict[str, Any], Route]:
    body = decode(raw, api)
    if route.to_openai is None:
        return body, route
    try:
        done: tuple[str, dict[str, Any]] | NodeError = route.to_openai(body)
    except NodeError as err:  # raised where the gateway translates, after its own checks, as before
        done = err
    except RecursionError:
        done = InvalidRequest("request body is nested too deeply")
    return body, dataclasses.replace(route, to_openai=_Translated(done))


class Intake:
    """Reads request bodies: on the loop when small, in a bounded thread pool when large."""

    def __init__(self, *, offload_bytes: int = OFFLOAD_BYTES, workers: int = WORKERS) -> None:
        self.offload_bytes = offload_bytes
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None  # started by the first large body

    async def read(self, raw: bytes, api: str, route: Route) -> tuple[dict[str, Any], Route]:
        """(the body, the route to translate it with: for a large body, one whose translation is already done)."""
        if len(raw) < self.offload_bytes:
            return decode(raw, api), route
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="infernode-intake")
        return await asyncio.get_running_loop().run_in_executor(self._pool, _read_large, raw, api, route)

    def close(self) -> None:
        """Stop the threads (a node shutting down)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
