"""The client fields the node checks before a worker sees them: sampling values, and strings it stores or counts.

A worker refuses a non-finite temperature, a negative `max_tokens` or a 30-item `stop`
with a 4xx or 5xx of its own, after queueing; the node refuses them first, with a 400
in the client's API naming the field (`param`). Strings the node keeps (`user` in the
ledger and per-user limits, `metadata`, the client's request id in logs) are bounded in
length and free of control characters. Each API has its own table: the field's name
as that API's clients send it, and its rule. Work is a dictionary lookup per top-level
field: a body's size does not change it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from node.errors import InvalidRequest

USER_CHARS = 256          # `user`, `safety_identifier`, Anthropic's `metadata.user_id`
MODEL_CHARS = 256         # a model's name as a client sends it
METADATA_KEYS = 16        # OpenAI's documented metadata limits: 16 pairs,
METADATA_KEY_CHARS = 64   # keys of at most 64 characters,
METADATA_VALUE_CHARS = 512  # string values of at most 512
STOP_ITEMS = 16           # stop sequences in one request
MAX_N = 16                # choices per request (`n`): each one is a whole generation
MAX_COUNT = (1 << 31) - 1  # token counts: the context check refuses what exceeds the model's context
MAX_TOP_LOGPROBS = 20
REQUEST_ID_CHARS = 128    # a client's x-request-id: longer ones are cut here

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PRINTABLE_ID = re.compile(rb"[\x20-\x7e]*")

Rule = Callable[[Any, str], None]


def _bad(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' must be {what}", param=param)


def number(lo: float, hi: float) -> Rule:
    """A finite JSON number in [lo, hi] (booleans are not numbers)."""
    def rule(v: Any, param: str) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise _bad(param, f"a finite number from {lo:g} to {hi:g}")
    return rule


def integer(lo: int, hi: int) -> Rule:
    """A JSON integer in [lo, hi]."""
    def rule(v: Any, param: str) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _bad(param, f"an integer from {lo} to {hi}")
    return rule


def boolean(v: Any, param: str) -> None:
    """true or false."""
    if not isinstance(v, bool):
        raise _bad(param, "true or false")


def logprobs(v: Any, param: str) -> None:
    """Chat's `logprobs` (a boolean) or completions' (how many, 0..20)."""
    if not isinstance(v, bool):
        integer(0, MAX_TOP_LOGPROBS)(v, param)


def stop(v: Any, param: str) -> None:
    """A string, or an array of at most STOP_ITEMS strings."""
    if isinstance(v, str):
        return
    if not isinstance(v, list) or len(v) > STOP_ITEMS or not all(isinstance(s, str) for s in v):
        raise _bad(param, f"a string or an array of at most {STOP_ITEMS} strings")


def stop_list(v: Any, param: str) -> None:
    """An array of at most STOP_ITEMS strings."""
    if not isinstance(v, list):
        raise _bad(param, f"an array of at most {STOP_ITEMS} strings")
    stop(v, param)


def ident(limit: int) -> Rule:
    """A string of at most `limit` characters without control characters (it is stored, counted or logged)."""
    def rule(v: Any, param: str) -> None:
        # isprintable() is the fast yes (no control, format or surrogate character); the regex the exact test.
        if not isinstance(v, str) or len(v) > limit or (not v.isprintable() and _CONTROL.search(v)):
            raise _bad(param, f"a string of at most {limit} characters without control characters")
    return rule


def metadata(v: Any, param: str) -> None:
    """OpenAI's metadata: at most 16 string pairs, keys ≤ 64 and values ≤ 512 characters."""
    if not isinstance(v, dict) or len(v) > METADATA_KEYS or not all(
            isinstance(k, str) and len(k) <= METADATA_KEY_CHARS and isinstance(s, str)
            and len(s) <= METADATA_VALUE_CHARS for k, s in v.items()):
        raise _bad(param, f"an object of at most {METADATA_KEYS} string values (keys of at most "
                          f"{METADATA_KEY_CHARS} characters, values of at most {METADATA_VALUE_CHARS})")


def anthropic_metadata(v: Any, param: str) -> None:
    """Anthropic's metadata: an object whose `user_id` is a bounded string."""
    if not isinstance(v, dict) or len(v) > METADATA_KEYS:
        raise _bad(param, f"an object with at most {METADATA_KEYS} fields")
    if v.get("user_id") is not None:
        ident(USER_CHARS)(v["user_id"], "metadata.user_id")


def num_predict(v: Any, param: str) -> None:
    """Ollama's num_predict: -1 (until done), -2 (fill the context) or a count of at least 1."""
    if v not in (-1, -2):
        integer(1, MAX_COUNT)(v, param)


def options(table: dict[str, Rule]) -> Rule:
    """An object whose fields follow `table` (Ollama's `options`)."""
    def rule(v: Any, param: str) -> None:
        if not isinstance(v, dict):
            raise _bad(param, "an object")
        _apply(v, table, param + ".")
    return rule


_MODEL = ident(MODEL_CHARS)
_USER = ident(USER_CHARS)
_COUNT = integer(1, MAX_COUNT)
_SAMPLING: dict[str, Rule] = {
    "temperature": number(0, 2), "top_p": number(0, 1), "min_p": number(0, 1), "top_k": integer(-1, MAX_COUNT),
    "presence_penalty": number(-2, 2), "frequency_penalty": number(-2, 2), "seed": integer(-(1 << 63), (1 << 64) - 1),
}
OPENAI: dict[str, Rule] = {
    **_SAMPLING, "model": _MODEL, "max_tokens": _COUNT, "max_completion_tokens": _COUNT, "n": integer(1, MAX_N),
    "stop": stop, "logprobs": logprobs, "top_logprobs": integer(0, MAX_TOP_LOGPROBS), "stream": boolean,
    "user": _USER, "metadata": metadata, "repetition_penalty": number(0, 10),
}
RESPONSES: dict[str, Rule] = {
    "model": _MODEL, "temperature": number(0, 2), "top_p": number(0, 1), "max_output_tokens": _COUNT,
    "top_logprobs": integer(0, MAX_TOP_LOGPROBS), "stream": boolean, "user": _USER, "safety_identifier": _USER,
    "metadata": metadata,
}
ANTHROPIC: dict[str, Rule] = {
    "model": _MODEL, "temperature": number(0, 1), "top_p": number(0, 1), "top_k": integer(0, MAX_COUNT),
    "max_tokens": _COUNT, "stop_sequences": stop_list, "stream": boolean, "metadata": anthropic_metadata,
    "user": _USER,  # not Anthropic's, but read (and stored) when a runtime serves the API itself
}
OLLAMA: dict[str, Rule] = {
    "model": _MODEL, "stream": boolean, "user": _USER, "options": options({
        **_SAMPLING, "num_predict": num_predict, "num_ctx": integer(1, MAX_COUNT), "stop": stop,
        "repeat_penalty": number(0, 10), "repeat_last_n": integer(-1, MAX_COUNT)}),
}
TABLES = {"openai": OPENAI, "responses": RESPONSES, "anthropic": ANTHROPIC, "ollama": OLLAMA}


def _apply(body: dict[str, Any], table: dict[str, Rule], prefix: str = "") -> None:
    # Over the body's own fields: a body has few top-level fields, the table has more.
    for name, value in body.items():
        rule = table.get(name)
        if rule is not None and value is not None:
            rule(value, prefix + name)


def check(body: dict[str, Any], api: str) -> None:
    """Raise InvalidRequest (naming the field) when a field the node or the worker reads is out of shape."""
    table = TABLES.get(api)
    if table is not None:
        _apply(body, table)


def request_id(raw: bytes | None) -> str | None:
    """A client's x-request-id as the node keeps it: printable ASCII, cut to REQUEST_ID_CHARS; else None.

    An id with control or non-ASCII bytes is not adopted (the node's own id stands in), so
    what reaches logs and the ledger is plain text.
    """
    if not raw:
        return None
    raw = raw[:REQUEST_ID_CHARS]
    return raw.decode("ascii") if _PRINTABLE_ID.fullmatch(raw) else None
