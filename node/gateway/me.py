"""Self-service for key holders: `GET /v1/me` (limits and what remains) and `GET /v1/me/usage`.

/v1/me is answered from memory; /v1/me/usage reads the ledger in a worker thread (a
key holder asking for its own history, not the request path of inference). Its answer
is kept `ME_USAGE_CACHE_S` seconds per key and query, and each key may make at most
`ME_USAGE_PER_MINUTE` uncached reads a minute (then 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict, deque
from typing import Any
from urllib.parse import parse_qs

from node.accounts.standing import standing
from node.errors import InvalidRequest, NotFound, RateLimited
from node.gateway.httpd import Connection, Request

JSON_CT = [(b"content-type", b"application/json")]
MAX_DAYS = 366
ME_USAGE_CACHE_S = 5.0        # an answer is reused this long for the same key and query
ME_USAGE_PER_MINUTE = 12      # uncached reads per key per minute
ME_USAGE_MAX_ROWS = 10_000    # (day, model) rows in one answer
ME_USAGE_TIMEOUT_S = 5.0      # the database stops a read past this
MAX_CACHED = 4096             # answers (and keys' read windows) kept at most


async def self_service(gateway: Any, key: Any, req: Request, ridb: bytes, conn: Connection) -> None:
    """Answer /v1/me or /v1/me/usage for the authenticated key (OpenAI error shape on failure)."""
    if req.path == b"/v1/me":
        body = standing(gateway.quotas, key, list(gateway.models))
    elif req.path == b"/v1/me/usage":
        answer = await gateway.me_usage.answer(key.id, req.query)
        conn.respond(200, JSON_CT + [(b"x-request-id", ridb)], answer)
        return
    else:
        raise NotFound(f"no route GET {req.path.decode('latin-1')[:200]}")
    conn.respond(200, JSON_CT + [(b"x-request-id", ridb)], json.dumps(body).encode())


class SelfUsage:
    """/v1/me/usage for every key: cached a few seconds, uncached reads paced per key."""

    def __init__(self, ledger: Any, *, cache_s: float = ME_USAGE_CACHE_S, per_minute: int = ME_USAGE_PER_MINUTE) -> None:
        self.ledger = ledger
        self.cache_s = cache_s
        self.per_minute = per_minute
        self._answers: OrderedDict[tuple[str, bytes], tuple[float, bytes]] = OrderedDict()
        self._reads: dict[str, deque[float]] = {}

    async def answer(self, key_id: str, query: bytes) -> bytes:
        """The JSON answer for a key's query: from the cache, else read (429 past the key's pace)."""
        since, until = _window(query)
        now = time.monotonic()
        hit = self._answers.get((key_id, query))
        if hit is not None and hit[0] > now:
            return hit[1]
        self._admit(key_id, now)
        ledger = self.ledger
        await asyncio.to_thread(ledger.flush)
        rows = await asyncio.to_thread(ledger.storage.usage_report, ["day", "model"], since, until, key_id, None, None,
                                       ME_USAGE_MAX_ROWS, 0, ME_USAGE_TIMEOUT_S)
        body = json.dumps({"object": "list", "key": key_id, "since": since, "until": until,
                           "group_by": ["day", "model"], "data": rows}).encode()
        self._answers[(key_id, query)] = (time.monotonic() + self.cache_s, body)
        self._answers.move_to_end((key_id, query))
        while len(self._answers) > MAX_CACHED:
            self._answers.popitem(last=False)
        return body

    def _admit(self, key_id: str, now: float) -> None:
        """Count one uncached read of `key_id`; 429 when it made per_minute of them in the last minute."""
        reads = self._reads.get(key_id)
        if reads is None:
            if len(self._reads) >= MAX_CACHED:  # forget keys that have not read for a minute
                self._reads = {k: d for k, d in self._reads.items() if d and d[-1] > now - 60}
            reads = self._reads[key_id] = deque()
        while reads and reads[0] <= now - 60:
            reads.popleft()
        if len(reads) >= self.per_minute:
            raise RateLimited(f"at most {self.per_minute} usage reads a minute per key; the answer is cached "
                              f"{self.cache_s:g} s", retry_after=reads[0] + 60 - now, reason="me_usage")
        reads.append(now)


def _window(query: bytes) -> tuple[float, float | None]:
    """since/until (unix seconds) from the query; the last 30 days by default, at most a year."""
    try:
        q = parse_qs(query.decode("latin-1"), max_num_fields=10, strict_parsing=False)
    except ValueError:
        raise InvalidRequest("too many query parameters") from None
    now = time.time()

    def num(name: str, default: float | None) -> float | None:
        vals = q.get(name)
        if not vals:
            return default
        try:
            v = float(vals[0])
        except ValueError:
            raise InvalidRequest(f"{name} must be unix seconds", param=name) from None
        if not (0 <= v < 1e11):
            raise InvalidRequest(f"{name} is out of range", param=name)
        return v
    since = num("since", now - 30 * 86400)
    until = num("until", None)
    assert since is not None
    if (until if until is not None else now) - since > MAX_DAYS * 86400:
        raise InvalidRequest(f"ask for at most {MAX_DAYS} days at a time", param="since")
    return since, until
