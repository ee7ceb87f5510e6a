"""Self-service for key holders: `GET /v1/me` (limits and what remains) and `GET /v1/me/usage`.

/v1/me is answered from memory; /v1/me/usage reads the ledger in a worker thread (a
key holder asking for its own history, not the request path of inference).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import parse_qs

from node.accounts.standing import standing
from node.errors import InvalidRequest, NotFound
from node.gateway.httpd import Connection, Request

JSON_CT = [(b"content-type", b"application/json")]
MAX_DAYS = 366


async def self_service(gateway: Any, key: Any, req: Request, ridb: bytes, conn: Connection) -> None:
    """Answer /v1/me or /v1/me/usage for the authenticated key (OpenAI error shape on failure)."""
    if req.path == b"/v1/me":
        body = standing(gateway.quotas, key, list(gateway.models))
    elif req.path == b"/v1/me/usage":
        since, until = _window(req.query)
        ledger = gateway.ledger
        await asyncio.to_thread(ledger.flush)
        rows = await asyncio.to_thread(ledger.storage.usage_report, ["day", "model"], since, until, key.id)
        body = {"object": "list", "key": key.id, "since": since, "until": until, "group_by": ["day", "model"],
                "data": rows}
    else:
        raise NotFound(f"no route GET {req.path.decode('latin-1')[:200]}")
    conn.respond(200, JSON_CT + [(b"x-request-id", ridb)], json.dumps(body).encode())


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
