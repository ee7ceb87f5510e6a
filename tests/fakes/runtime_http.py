"""HTTP plumbing shared by the runtime stand-ins (vllm_server, sglang_server, ollama_server).

Standard library only, so a stand-in starts in a fraction of a second under any
`python3`. It answers the OpenAI routes the real servers share, in the shapes of
OpenAI's API reference (platform.openai.com/docs/api-reference) as vLLM, SGLang and
Ollama implement them: `/v1/models`, `/v1/chat/completions` and `/v1/completions`
(JSON, or SSE `data: {...}` events ending `data: [DONE]`, with a final `choices: []`
usage chunk only when `stream_options.include_usage` is true) and `/v1/embeddings`.

Misbehaviour is asked for through the environment, which the node passes from a
model's `env` table:

  FAKE_RUNTIME_START_DELAY_S     load this long before answering health (the model load)
  FAKE_RUNTIME_CRASH_AFTER_S     exit with FAKE_RUNTIME_CRASH_CODE (default 1) after this long
  FAKE_RUNTIME_HANG_AFTER_S      stop answering any request after this long (process stays)
  FAKE_RUNTIME_FAIL_HEALTH       "1": health answers 503 from the start;
  FAKE_RUNTIME_FAIL_HEALTH_AFTER_S   ... or only after this long
  FAKE_RUNTIME_IGNORE_SIGTERM    "1": log SIGTERM and keep running (SIGKILL still works)
  FAKE_RUNTIME_RECORD            a file to write {argv, env, pid} to at start (for tests)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RECORDED_ENV = ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_KEEP_ALIVE",
                "OLLAMA_NOPRUNE", "OLLAMA_CONTEXT_LENGTH", "VLLM_NO_USAGE_STATS", "VLLM_CPU_KVCACHE_SPACE")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")


def _env_float(name: str) -> float | None:
    v = os.environ.get(name)
    return float(v) if v else None


@dataclass
class Behaviour:
    """What the stand-in was told to do wrong, read from the environment."""

    start_delay_s: float = 0.0
    crash_after_s: float | None = None
    crash_code: int = 1
    hang_after_s: float | None = None
    fail_health_after_s: float | None = None
    ignore_sigterm: bool = False
    record: str | None = None

    @classmethod
    def from_env(cls) -> Behaviour:
        fail = 0.0 if os.environ.get("FAKE_RUNTIME_FAIL_HEALTH") == "1" else _env_float("FAKE_RUNTIME_FAIL_HEALTH_AFTER_S")
        return cls(start_delay_s=_env_float("FAKE_RUNTIME_START_DELAY_S") or 0.0,
                   crash_after_s=_env_float("FAKE_RUNTIME_CRASH_AFTER_S"),
                   crash_code=int(os.environ.get("FAKE_RUNTIME_CRASH_CODE", "1")),
                   hang_after_s=_env_float("FAKE_RUNTIME_HANG_AFTER_S"),
                   fail_health_after_s=fail,
                   ignore_sigterm=os.environ.get("FAKE_RUNTIME_IGNORE_SIGTERM") == "1",
                   record=os.environ.get("FAKE_RUNTIME_RECORD") or None)


class Runtime:
    """The state one stand-in process serves from."""

    def __init__(self, program: str, behaviour: Behaviour, *, owned_by: str, max_model_len: int = 2048) -> None:
        self.program, self.behaviour, self.owned_by, self.max_model_len = program, behaviour, owned_by, max_model_len
        self.started = time.monotonic()
        self.models: Callable[[], list[str]] = lambda: []

    def since(self) -> float:
        return time.monotonic() - self.started

    def loaded(self) -> bool:
        return self.since() >= self.behaviour.start_delay_s

    def healthy(self) -> bool:
        fail = self.behaviour.fail_health_after_s
        return self.loaded() and (fail is None or self.since() < fail)

    def hung(self) -> bool:
        hang = self.behaviour.hang_after_s
        return hang is not None and self.since() >= hang

    def log(self, line: str) -> None:
        print(line, flush=True)


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the functions a stand-in registered in `routes`."""

    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    runtime: Runtime
    routes: dict[tuple[str, str], Callable[[Handler], None]] = {}

    def log_message(self, fmt: str, *args: Any) -> None:
        self.runtime.log(f"INFO:     {self.client_address[0]} - \"{self.command} {self.path}\" {args[1] if len(args) > 1 else ''}")

    def _dispatch(self) -> None:
        self.__dict__.pop("_body", None)  # one handler serves every request of a keep-alive connection
        if self.runtime.hung():
            time.sleep(3600)  # accept, never answer: a wedged worker
            return
        fn = self.routes.get((self.command, self.path.split("?", 1)[0]))
        if fn is None:
            self.send_json(404, {"detail": "Not Found"})
            return
        fn(self)

    do_GET = do_POST = do_HEAD = do_DELETE = _dispatch

    def body(self) -> dict[str, Any]:
        """The JSON body (read once, then remembered: routes may look at it twice)."""
        if not hasattr(self, "_body"):
            n = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                data = {}
            self._body: dict[str, Any] = data if isinstance(data, dict) else {}
        return self._body

    def send_json(self, status: int, data: Any) -> None:
        self.send_bytes(status, json.dumps(data).encode(), "application/json")

    def send_bytes(self, status: int, payload: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# -- OpenAI routes ---------------------------------------------------------------

def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    else:
        p = body.get("prompt", "")
        text = " ".join(map(str, p)) if isinstance(p, list) else str(p)
    return max(1, len(text.split()))


def openai_models(h: Handler) -> None:
    rt = h.runtime
    h.send_json(200, {"object": "list", "data": [
        {"id": m, "object": "model", "created": int(time.time()), "owned_by": rt.owned_by, "root": m,
         "max_model_len": rt.max_model_len} for m in rt.models()]})


def openai_error(h: Handler, status: int, message: str, kind: str) -> None:
    h.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})


def _generation(h: Handler, chat: bool, not_found: Callable[[Handler, str], None]) -> None:
    body = h.body()
    model = body.get("model")
    if model not in h.runtime.models():
        not_found(h, str(model))
        return
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 8)
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    prompt = _prompt_tokens(body)
    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-fake{time.monotonic_ns()}", int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if not body.get("stream"):
        text = " ".join(words)
        choice = {"index": 0, "finish_reason": "length",
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        h.send_json(200, {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], "usage": usage})
        return
    h.start_stream("text/event-stream; charset=utf-8")
    kind += ".chunk" if chat else ""
    for i, w in enumerate(words):
        piece = (" " if i else "") + w
        choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None,
                  **({"delta": {"content": piece, **({"role": "assistant"} if i == 0 else {})}} if chat else {"text": piece})}
        h.chunk(b"data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}).encode() + b"\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        h.chunk(b"data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                                        "usage": usage}).encode() + b"\n\n")
    h.chunk(b"data: [DONE]\n\n")
    h.end_stream()


def openai_embeddings(h: Handler, not_found: Callable[[Handler, str], None]) -> None:
    body = h.body()
    model = body.get("model")
    if model not in h.runtime.models():
        not_found(h, str(model))
        return
    inputs = body.get("input", "")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = [{"object": "embedding", "index": i, "embedding": [((len(str(x)) + j) % 7) / 7.0 for j in range(8)]}
            for i, x in enumerate(inputs)]
    tokens = sum(max(1, len(str(x).split())) for x in inputs)
    h.send_json(200, {"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def add_openai_routes(routes: dict[tuple[str, str], Callable[[Handler], None]],
                      not_found: Callable[[Handler, str], None]) -> None:
    """The /v1 routes, answering unknown models through the runtime's own `not_found`."""
    routes[("GET", "/v1/models")] = openai_models
    routes[("POST", "/v1/chat/completions")] = lambda h: _generation(h, True, not_found)
    routes[("POST", "/v1/completions")] = lambda h: _generation(h, False, not_found)
    routes[("POST", "/v1/embeddings")] = lambda h: openai_embeddings(h, not_found)


# -- process lifecycle -------------------------------------------------------------

def record_start(rt: Runtime) -> None:
    if rt.behaviour.record:
        with open(rt.behaviour.record, "w") as f:
            json.dump({"argv": sys.argv, "pid": os.getpid(), "env": {k: os.environ.get(k) for k in RECORDED_ENV}}, f)


def serve(rt: Runtime, host: str, port: int, routes: dict[tuple[str, str], Callable[[Handler], None]], *,
          bind_after_load: bool) -> int:
    """Run until SIGTERM/SIGINT (unless told to ignore it) or the planned crash; the exit code."""
    record_start(rt)
    b = rt.behaviour
    stop = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        if b.ignore_sigterm and signum == signal.SIGTERM:
            rt.log("WARNING:  SIGTERM received and ignored (FAKE_RUNTIME_IGNORE_SIGTERM)")
            return
        rt.log("INFO:     Shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if b.crash_after_s is not None:
        def crash() -> None:
            rt.log(f"ERROR:    engine core died unexpectedly (FAKE_RUNTIME_CRASH_AFTER_S={b.crash_after_s})")
            os._exit(b.crash_code)
        timer = threading.Timer(b.crash_after_s, crash)
        timer.daemon = True  # a clean SIGTERM exit must not wait for the planned crash
        timer.start()
    if bind_after_load:  # vLLM opens its port only once the engine is up
        while not rt.loaded() and not stop.is_set():
            time.sleep(0.05)
        if stop.is_set():
            return 0
    handler = type("BoundHandler", (Handler,), {"runtime": rt, "routes": routes})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        rt.log(f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address ('{host}', {port}): {exc.strerror}")
        return 1
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rt.log(f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")
    while not stop.wait(0.1):
        pass
    server.shutdown()
    server.server_close()
    return 0
