"""Relay: the worker's answer written to the client, in the client's API, by one writer for every API.

OpenAI's `/v1` paths (the `OPENAI` route) get the worker's bytes unchanged: a whole
answer as it came, a stream as whole SSE events as they arrive, only usage looked into
(node/gateway/sse.py). Another API's route reshapes them: a whole answer through
`Route.from_openai`, a stream event by event through its translator, a worker's error into
its error shape. Either way the quotas are charged (settle) before the client sees the
end of a stream, so its next request already counts those tokens.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from node.errors import NodeError, UpstreamError, UpstreamTimeout
from node.gateway.adapter import Call, Route, StreamTranslator, sse_chunks
from node.gateway.bodies import WorkerRefused, tokens, usage_of, worker_error, worker_message
from node.gateway.exchange import JSON_CT, Exchange, Upstream
from node.gateway.httpd import Connection
from node.gateway.settle import Settlement
from node.gateway.sse import SseRelay
from node.gateway.upstream import BrokenResponse, Response, TimedOut, UpstreamFailure

log = logging.getLogger("infernode.gateway")


async def read_or_fail(resp: Response, ex: Exchange) -> bytes:
    """A whole (non-streamed) answer; a worker failing half way is a 502/504 from the worker."""
    try:
        return await resp.read()
    except TimedOut:
        raise UpstreamTimeout(f"the worker for '{ex.model}' stopped answering", source="worker") from None
    except BrokenResponse as exc:
        log.warning("request %s: the worker for %s failed: %s", ex.rid, ex.model, exc)
        raise UpstreamError(f"the worker for '{ex.model}' failed: {exc}", source="worker") from None


def stream_tokens(relay: SseRelay, ex: Exchange) -> None:
    """Token counts of a stream: the worker's usage chunk, else one per content event."""
    if relay.usage:
        ex.prompt_tokens, ex.completion_tokens = tokens(relay.usage)
    elif relay.count_content:
        ex.completion_tokens = relay.content_events


class StreamWriter(Protocol):
    """A stream in the client's API, from whole upstream SSE events."""

    def feed(self, out: bytes) -> tuple[bytes, bool]:
        """(what to send, whether the client's stream ends with it)."""

    def finish(self, ex: Exchange) -> bytes:
        """What follows the last event (the tokens are counted by then)."""

    def unfinished(self, ex: Exchange) -> bytes:
        """The end of a stream whose worker stopped without ending it."""

    def fail(self, err: NodeError) -> bytes:
        """The end of a stream whose worker failed mid-way."""


class Passthrough:
    """OpenAI's stream as the worker sends it; the usage chunk made up when the runtime sends none."""

    __slots__ = ("relay", "synth", "ex")

    def __init__(self, relay: SseRelay, synth: bool, ex: Exchange) -> None:
        self.relay, self.synth, self.ex = relay, synth, ex

    def feed(self, out: bytes) -> tuple[bytes, bool]:
        relay = self.relay
        done = relay.saw_done and not relay.buf
        if self.synth and relay.saw_done:
            out = relay.synth_usage(out, model=self.ex.model, chat=self.ex.endpoint == "chat",
                                    prompt_tokens=self.ex.prompt_tokens)
        return out, done

    def finish(self, ex: Exchange) -> bytes:
        return b""

    def unfinished(self, ex: Exchange) -> bytes:
        return self.relay.buf

    def fail(self, err: NodeError) -> bytes:
        return b"data: " + err.body() + b"\n\ndata: [DONE]\n\n" + self.relay.buf


class Translating:
    """Another API's stream: each upstream event through the route's translator."""

    __slots__ = ("relay", "tr")

    def __init__(self, relay: SseRelay, tr: StreamTranslator) -> None:
        self.relay, self.tr = relay, tr

    def feed(self, out: bytes) -> tuple[bytes, bool]:
        feed = self.tr.feed
        return b"".join([feed(c) for c in sse_chunks(out)]), self.relay.saw_done

    def finish(self, ex: Exchange) -> bytes:
        return self.tr.finish(ex.prompt_tokens, ex.completion_tokens)

    unfinished = finish

    def fail(self, err: NodeError) -> bytes:
        return self.tr.fail(err)


async def relay(up: Upstream, route: Route, call: Call | None, settlement: Settlement,
                out_headers: list[tuple[bytes, bytes]], conn: Connection) -> None:
    """Write the worker's answer to the client in the route's API."""
    resp, ex = up.resp, settlement.ex
    if resp.status >= 400:
        raw = await read_or_fail(resp, ex)
        log.info("request %s: worker answered %d", ex.rid, resp.status)
        if route.passthrough:
            status, body = (resp.status if resp.status < 500 else 502), worker_error(raw, resp.status)
        else:
            status, body = route.error(WorkerRefused(worker_message(raw), resp.status), ex.client_rid or ex.rid)
        ex.status = status  # what the client got: a worker's 5xx is the node's 502
        conn.respond(status, JSON_CT + out_headers, body)
        return
    ctype = resp.header(b"content-type") or b""
    if not ex.stream or not ctype.startswith(b"text/event-stream"):
        await _whole(resp, ex, route, call, ctype, out_headers, conn)
        return
    passthrough = route.passthrough or up.native
    sse = SseRelay(drop_usage=not up.wants_usage and not up.native, count_content=not up.worker_usage)
    if passthrough:
        writer: StreamWriter = Passthrough(sse, sse.count_content and up.wants_usage, ex)
    else:
        assert route.streamer is not None and call is not None
        writer = Translating(sse, route.streamer(call))
    await _stream(resp, sse, writer, route, settlement, out_headers, conn)


async def _whole(resp: Response, ex: Exchange, route: Route, call: Call | None, ctype: bytes,
                 out_headers: list[tuple[bytes, bytes]], conn: Connection) -> None:
    raw = await read_or_fail(resp, ex)
    ex.first_token_at = time.perf_counter()
    if route.passthrough or call is None:
        usage = usage_of(raw)
        if usage:
            ex.prompt_tokens, ex.completion_tokens = tokens(usage)
        conn.respond(resp.status, [(b"content-type", ctype or b"application/json")] + out_headers, raw)
        return
    try:
        obj: Any = json.loads(raw)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise UpstreamError(f"the worker for '{ex.model}' answered something that is not JSON", source="worker")
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage:
        ex.prompt_tokens, completion = tokens(usage)
        ex.completion_tokens = 0 if route.prompt_only else completion
    assert route.from_openai is not None
    conn.respond(200, [(b"content-type", route.content_type)] + out_headers, route.from_openai(obj, call))


async def _stream(resp: Response, sse: SseRelay, writer: StreamWriter, route: Route, settlement: Settlement,
                  out_headers: list[tuple[bytes, bytes]], conn: Connection) -> None:
    ex = settlement.ex
    conn.start(200, [(b"content-type", route.stream_type), (b"cache-control", b"no-cache")] + out_headers)
    failed: NodeError | None = None
    finished = False  # the client's stream has ended; what follows upstream is only drained
    try:
        async for chunk in resp.chunks():
            out = sse.feed(chunk)
            if not out or finished:
                continue
            if ex.first_token_at is None and sse.first_content:
                ex.first_token_at = time.perf_counter()
            data, finished = writer.feed(out)
            if finished:
                resp.drain_timeout(5.0)  # only the end of the framing should follow
                stream_tokens(sse, ex)
                settlement.charge()  # before the client sees the end
                conn.end(data + writer.finish(ex))  # the last event and the end of the body in one write
            elif data:
                await conn.write(data)
    except UpstreamFailure as exc:
        if not finished:
            ex.status = 502
            log.warning("request %s: the worker for %s failed mid-stream: %s", ex.rid, ex.model, exc)
            failed = UpstreamError(f"the worker for '{ex.model}' failed mid-stream: {exc}", source="worker")
    finally:
        stream_tokens(sse, ex)  # a client gone mid-stream is charged what it was sent
    if failed is not None:
        conn.end(writer.fail(failed))
    elif not finished:
        settlement.charge()
        conn.end(writer.unfinished(ex))
