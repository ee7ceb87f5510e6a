"""Answering a translated route: the worker's OpenAI answer reshaped by the route, streams event by event.

The gateway's core (node/gateway/proxy.py) has authenticated, admitted, translated the
request and called the worker; this module turns what comes back into the client's
API: a worker error into the API's error shape, a whole answer through
`Route.from_openai`, and a stream chunk by chunk through the route's stream translator
(nothing is held back beyond what the client's protocol itself needs).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from node.errors import NodeError, UpstreamError, UpstreamTimeout
from node.gateway.adapter import Call, Route, sse_chunks
from node.gateway.bodies import scrub
from node.gateway.httpd import Connection
from node.gateway.sse import SseRelay
from node.gateway.upstream import BrokenResponse, Response, TimedOut, UpstreamFailure

log = logging.getLogger("infernode.gateway")

SUBPATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}


class WorkerRefused(NodeError):
    """The worker's own 4xx/5xx, carried into another API's error shape."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, source="worker")
        self.status = status if status < 500 else 502
        self.type = "invalid_request_error" if status < 500 else "upstream_error"


def worker_message(raw: bytes) -> str:
    """The message of a worker's error body (OpenAI's shape, FastAPI's `detail`, or text), scrubbed of internals."""
    return scrub(_message_of(raw))


def _message_of(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")[:2000]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if "detail" in obj:
            return obj["detail"] if isinstance(obj["detail"], str) else json.dumps(obj["detail"])[:2000]
    return json.dumps(obj)[:2000]


async def _read(resp: Response, ex: Any) -> bytes:
    try:
        return await resp.read()
    except TimedOut:
        raise UpstreamTimeout(f"the worker for '{ex.model}' stopped answering", source="worker") from None
    except BrokenResponse as exc:
        raise UpstreamError(f"the worker for '{ex.model}' failed: {exc}", source="worker") from None


def _tokens(ex: Any, usage: dict[str, Any] | None, route: Route) -> None:
    if usage:
        ex.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        ex.completion_tokens = 0 if route.prompt_only else int(usage.get("completion_tokens") or 0)


async def answer(resp: Response, ex: Any, adm: Any, relay: SseRelay | None, route: Route, call: Call,
                 out_headers: list[tuple[bytes, bytes]], conn: Connection) -> None:
    """Write the worker's answer to the client in the route's API."""
    if resp.status >= 400:
        raw = await _read(resp, ex)
        log.info("request %s: worker answered %d", ex.rid, resp.status)
        status, body = route.error(WorkerRefused(worker_message(raw), resp.status), ex.client_rid or ex.rid)
        ex.status = status  # what the client got (a worker's 5xx is a 502)
        conn.respond(status, [(b"content-type", b"application/json")] + out_headers, body)
        return
    ctype = resp.header(b"content-type") or b""
    if relay is None or not ctype.startswith(b"text/event-stream"):
        raw = await _read(resp, ex)
        ex.first_token_at = time.perf_counter()
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamError(f"the worker for '{ex.model}' answered something that is not JSON", source="worker")
        _tokens(ex, obj.get("usage"), route)
        assert route.from_openai is not None
        conn.respond(200, [(b"content-type", route.content_type)] + out_headers, route.from_openai(obj, call))
        return
    await _stream(resp, ex, adm, relay, route, call, out_headers, conn)


async def _stream(resp: Response, ex: Any, adm: Any, relay: SseRelay, route: Route, call: Call,
                  out_headers: list[tuple[bytes, bytes]], conn: Connection) -> None:
    assert route.streamer is not None
    tr = route.streamer(call)
    conn.start(200, [(b"content-type", route.stream_type), (b"cache-control", b"no-cache")] + out_headers)
    failed: NodeError | None = None
    finished = False  # the client's stream has ended; what follows upstream is only drained
    try:
        async for chunk in resp.chunks():
            out = relay.feed(chunk)
            if not out or finished:
                continue
            if ex.first_token_at is None and relay.first_content:
                ex.first_token_at = time.perf_counter()
            data = b"".join([tr.feed(c) for c in sse_chunks(out)])
            if relay.saw_done:
                resp.drain_timeout(5.0)  # only the end of the framing should follow
                finished = True
                _end(data, ex, adm, relay, tr, conn)
            elif data:
                await conn.write(data)
    except UpstreamFailure as exc:
        if not finished:
            ex.status = 502
            log.warning("request %s: the worker for %s failed mid-stream: %s", ex.rid, ex.model, exc)
            failed = UpstreamError(f"the worker for '{ex.model}' failed mid-stream: {exc}", source="worker")
    if failed is not None:
        settle(relay, ex)
        conn.end(tr.fail(failed))
    elif not finished:
        _end(b"", ex, adm, relay, tr, conn)


def _end(data: bytes, ex: Any, adm: Any, relay: SseRelay, tr: Any, conn: Connection) -> None:
    settle(relay, ex)
    # Charge quotas before the client sees the end, so its next request already counts them.
    adm.finish(ex.prompt_tokens, ex.completion_tokens)
    conn.end(data + tr.finish(ex.prompt_tokens, ex.completion_tokens))


def settle(relay: SseRelay, ex: Any) -> None:
    """Token counts of a stream: the worker's usage chunk, else one per content event."""
    if relay.usage:
        ex.prompt_tokens = int(relay.usage.get("prompt_tokens") or 0)
        ex.completion_tokens = int(relay.usage.get("completion_tokens") or 0)
    elif relay.count_content:
        ex.completion_tokens = relay.content_events
