"""A fast stand-in OpenAI-compatible worker, for gateway tests and the benchmark.

It speaks the OpenAI HTTP API as vLLM's OpenAI server does (documented at
platform.openai.com/docs/api-reference/chat and docs.vllm.ai "OpenAI-Compatible
Server"): `GET /v1/models`, `POST /v1/chat/completions` and `/v1/completions` (JSON, or
SSE `data: {...}` events ending in `data: [DONE]` when `stream` is true, with a final
`choices: []` usage chunk only when `stream_options.include_usage` is true),
`/v1/embeddings`, `/v1/rerank` and `/v1/score` (vLLM's), and `GET /health`. Errors use
OpenAI's `{"error": {"message", "type", "param", "code"}}` shape.

It is written over bare asyncio (HTTP/1.1, keep-alive, content-length requests, chunked
streamed responses) so that it costs little CPU and the benchmark measures the node.

Misbehaviour is asked for per request with an extra body field `"stub": {...}`, which
also proves the gateway passes unknown fields through:
`status`/`message` answer that HTTP error; `delay_s` waits before answering;
`chunks` sets the number of content chunks; `chunk_delay_s` paces them; `die_after`
drops the connection after that many chunks; `exit_after` kills the whole process
after that many chunks (a worker crash); `eol` ("crlf" or "cr") frames a stream's SSE
lines with that line ending instead of LF. A body the stub cannot read is a 400, as a
real server's validation would answer. Every request, and every client that went
away before a stream ended, is recorded and served at `GET /stub/events`.

Tools, as OpenAI's function calling guide and chat API reference describe them: a chat
request with `tools` (and `tool_choice` not "none") whose last message is not a `tool`
result is answered with one call of the first tool, arguments `{"city": "Paris"}`,
`finish_reason: "tool_calls"`; streamed, the first chunk carries the call's index, id,
type and name with empty arguments, the arguments follow in two pieces, and a last
chunk has an empty delta and the finish_reason.

Run: `python -m tests.fakes.openai_worker --port N [--model NAME] [--chunks 32]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 422: b"Unprocessable Entity", 429: b"Too Many Requests",
           500: b"Internal Server Error", 503: b"Service Unavailable"}


class Stub:
    """The stub's settings and what it has seen."""

    def __init__(self, model: str, chunks: int, max_model_len: int) -> None:
        self.model, self.chunks, self.max_model_len = model, chunks, max_model_len
        self.events: list[dict[str, Any]] = []
        self.record = True


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: parse requests, answer them in order."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()
        self.busy = False
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        lines = self.buf[:head_end].split(b"\r\n")
        method, path, _ = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode()] = v.strip().decode("latin-1")
        size = int(headers.get("content-length", "0"))
        if len(self.buf) < head_end + 4 + size:
            return
        body = self.buf[head_end + 4: head_end + 4 + size]
        self.buf = self.buf[head_end + 4 + size:]
        self.busy = True
        asyncio.get_running_loop().create_task(self._serve(method.decode(), path.decode(), headers, body))

    async def _serve(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        try:
            await self._route(method, path, headers, body)
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
            if self.transport is not None and not self.lost.is_set():  # a body of a shape the stub cannot read
                self._error(400, f"the stub cannot read this request: {type(exc).__name__}")
        finally:
            self.busy = False
            if self.buf and not self.lost.is_set():
                self._next()

    def _send(self, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (status, REASONS.get(status, b"X"), ctype, len(body), body))

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "internal_server_error"
        self._send(status, json.dumps({"error": {"message": message, "type": kind, "param": param,
                                                 "code": status}}).encode())

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        stub = self.stub
        if method == "GET" and path == "/stub/events":
            return self._send(200, json.dumps(stub.events).encode())
        if method == "GET" and path == "/health":
            return self._send(200, b"")
        if method == "GET" and path == "/v1/models":
            return self._send(200, json.dumps({"object": "list", "data": [{
                "id": stub.model, "object": "model", "created": 0, "owned_by": "stub",
                "max_model_len": stub.max_model_len}]}).encode())
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
                 "/v1/rerank": "rerank", "/v1/score": "score"}
        kind = kinds.get(path)
        if kind is None or method != "POST":
            return self._error(404, f"no route {method} {path}")
        try:
            req = json.loads(body)
        except ValueError:
            return self._error(400, "body is not JSON")
        ctl = req.get("stub") or {}
        if stub.record:
            stub.events.append({"event": "request", "path": path, "body": req,
                                "request_id": headers.get("x-request-id"), "host": headers.get("host"),
                                "authorization": headers.get("authorization")})
        if ctl.get("delay_s"):  # "thinking": a client that goes away meanwhile is noticed and recorded
            try:
                await asyncio.wait_for(self.lost.wait(), ctl["delay_s"])
                stub.events.append({"event": "disconnect", "after_chunks": 0, "request_id": headers.get("x-request-id")})
                return
            except TimeoutError:
                pass
        if ctl.get("status"):
            return self._error(int(ctl["status"]), ctl.get("message", "stub error"), ctl.get("param"))
        if req.get("model") != stub.model:
            return self._error(404, f"The model `{req.get('model')}` does not exist.", "model")
        if kind == "embeddings":
            inputs = req.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
            return self._send(200, json.dumps({"object": "list", "data": data, "model": stub.model,
                                               "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}).encode())
        if kind in ("rerank", "score"):
            return self._send(200, json.dumps({"id": "score-1", "model": stub.model, kind: True, "results": [
                {"index": i, "relevance_score": 0.5} for i, _ in enumerate(req.get("documents") or [0])],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode())
        n = int(ctl.get("chunks", stub.chunks))
        created = int(time.time())
        if kind == "chat" and _wants_tool(req):
            return await self._tool_call(req, created)
        obj = "chat.completion" if kind == "chat" else "text_completion"
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        if not req.get("stream"):
            text = "tok " * n
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if kind == "chat" else {"index": 0, "text": text, "finish_reason": "length"})
            return self._send(200, json.dumps({"id": "cmpl-stub", "object": obj, "created": created, "model": stub.model,
                                               "choices": [choice], "usage": usage}).encode())
        await self._stream(req, kind, n, created, usage, ctl, headers.get("x-request-id"))

    async def _stream(self, req: dict, kind: str, n: int, created: int, usage: dict, ctl: dict,
                      rid: str | None) -> None:
        assert self.transport is not None
        t = self.transport
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        obj = b"chat.completion.chunk" if kind == "chat" else b"text_completion"
        head = b'data: {"id":"cmpl-stub","object":"%s","created":%d,"model":"%s","choices":[' % (
            obj, created, self.stub.model.encode())
        piece = b'{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n' if kind == "chat" else \
            b'{"index":0,"text":"tok ","finish_reason":null}]}\n\n'
        eol = {"crlf": b"\r\n", "cr": b"\r"}.get(ctl.get("eol"), b"\n")
        event = (head + piece).replace(b"\n", eol)
        frame = b"%x\r\n%s\r\n" % (len(event), event)
        delay = float(ctl.get("chunk_delay_s", 0))
        for i in range(n):
            if self.lost.is_set():
                self.stub.events.append({"event": "disconnect", "after_chunks": i, "request_id": rid})
                return
            if i == ctl.get("die_after"):
                t.abort()
                return
            if i == ctl.get("exit_after"):
                os._exit(3)
            t.write(frame)
            if delay:
                try:
                    await asyncio.wait_for(self.lost.wait(), delay)
                except TimeoutError:
                    pass
            elif not self.writable.is_set():
                await self.writable.wait()
        tail = b""
        if (req.get("stream_options") or {}).get("include_usage"):
            tail += head + b'],"usage":' + json.dumps(usage, separators=(",", ":")).encode() + b"}\n\n"
        tail += b"data: [DONE]\n\n"
        tail = tail.replace(b"\n", eol)
        t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))


    async def _tool_call(self, req: dict, created: int) -> None:
        assert self.transport is not None
        name = req["tools"][0]["function"]["name"]
        args = json.dumps({"city": "Paris"})
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        base = {"id": "cmpl-stub", "object": "chat.completion", "created": created, "model": self.stub.model}
        call = {"id": "call_stub_1", "type": "function", "function": {"name": name, "arguments": args}}
        if not req.get("stream"):
            return self._send(200, json.dumps({**base, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [call]}}], "usage": usage}).encode())
        base["object"] = "chat.completion.chunk"
        deltas = [{"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_stub_1", "type": "function", "function": {"name": name, "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": args[:5]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": args[5:]}}]}]
        events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def _wants_tool(req: dict) -> bool:
    """A chat request the stand-in answers with a tool call (see the module's docstring)."""
    messages = req.get("messages") or [{}]
    return bool(req.get("tools")) and req.get("tool_choice") != "none" and \
        isinstance(messages[-1], dict) and messages[-1].get("role") != "tool"


async def serve(host: str, port: int, stub: Stub) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(stub), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="stub-model")
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--no-record", action="store_true", help="keep no event log (benchmark)")
    a = p.parse_args()
    stub = Stub(a.model, a.chunks, a.max_model_len)
    stub.record = not a.no_record
    try:
        import uvloop
        uvloop.run(serve(a.host, a.port, stub))
    except ImportError:
        asyncio.run(serve(a.host, a.port, stub))


def start(port: int, *args: str) -> subprocess.Popen[bytes]:
    """Start the stub as a child process and wait until it answers (for tests and the benchmark)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_worker", "--port", str(port), *args],
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the stub worker exited with {proc.returncode}") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the stub worker did not start in 30 s")


if __name__ == "__main__":
    main()
