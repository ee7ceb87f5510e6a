"""`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shapes, or Anthropic's when its SDK asks.

The anthropic SDK sends `anthropic-version` (and its key as `x-api-key`); it gets
Anthropic's model objects (`{"type": "model", "id", "display_name", "created_at"}`),
its list (`data`, `first_id`, `last_id`, `has_more`, paged by `limit` and `after_id`)
and its error shape. Everyone else gets OpenAI's. A model the key may not use is as
unknown as one the node does not serve: 404, never a hint that it exists.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from node.errors import InvalidRequest, ModelNotFound, NodeError
from node.gateway import anthropic
from node.gateway.httpd import Connection, Request

JSON_CT = [(b"content-type", b"application/json")]
PREFIX = b"/v1/models/"
MAX_ID_BYTES = 1024


def is_catalog(path: bytes) -> bool:
    """Whether a /v1 path is the model listing or one model's card."""
    return path == b"/v1/models" or path.startswith(PREFIX)


def _anthropic(req: Request) -> bool:
    return req.header(b"anthropic-version") is not None


def _openai_model(gateway: Any, m: Any) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "infernode",
            "max_model_len": gateway.context_len(m)}


def _anthropic_model(m: Any) -> dict[str, Any]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created))
    return {"type": "model", "id": m.name, "display_name": m.name, "created_at": created}


def answer(gateway: Any, key: Any, req: Request, ridb: bytes, conn: Connection) -> None:
    """Answer a model listing or card for the authenticated key, in the asking SDK's shapes."""
    try:
        body = _card(gateway, key, req) if req.path.startswith(PREFIX) else _listing(gateway, key, req)
    except NodeError as err:
        if not _anthropic(req):
            raise  # the gateway answers it in OpenAI's shape
        status, out = anthropic.error(err, ridb.decode("latin-1"))
        headers = JSON_CT + [(b"x-request-id", ridb)] + ([] if err.retryable else [(b"x-should-retry", b"false")])
        conn.respond(status, headers, out)
        return
    conn.respond(200, JSON_CT + [(b"x-request-id", ridb)], json.dumps(body).encode())


def _card(gateway: Any, key: Any, req: Request) -> dict[str, Any]:
    raw = req.path[len(PREFIX):]
    try:
        # Model ids may hold `/` and `:`; clients send them as they are or percent-encoded.
        name = unquote_to_bytes(raw[:MAX_ID_BYTES * 3]).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelNotFound("the model id is not UTF-8", param="model") from None
    m = gateway.models.get(name)
    if m is None or not gateway.quotas.allows(key, name):
        raise ModelNotFound(f"the model '{name[:256]}' does not exist on this node", param="model")
    return _anthropic_model(m) if _anthropic(req) else _openai_model(gateway, m)


def _listing(gateway: Any, key: Any, req: Request) -> dict[str, Any]:
    models = [m for m in gateway.models.values() if gateway.quotas.allows(key, m.name)]
    if not _anthropic(req):
        return {"object": "list", "data": [_openai_model(gateway, m) for m in models]}
    query = parse_qs(req.query.decode("latin-1"), max_num_fields=8) if req.query else {}
    try:
        limit = int(query.get("limit", ["20"])[0])
    except ValueError:
        raise InvalidRequest("'limit' must be an integer from 1 to 1000", param="limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("'limit' must be an integer from 1 to 1000", param="limit")
    after = query.get("after_id", [None])[0]
    if after is not None:
        names = [m.name for m in models]
        models = models[names.index(after) + 1:] if after in names else []
    page = models[:limit]
    data = [_anthropic_model(m) for m in page]
    return {"data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
            "has_more": len(models) > limit}
