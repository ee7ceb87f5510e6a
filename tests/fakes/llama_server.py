#!/usr/bin/env python3
"""A misbehaving stand-in for llama.cpp's `llama-server`, for supervisor tests (faults on demand).

The real llama-server runs in the other tests; this one exists to crash, hang and fail
when told. Set as the worker's binary (`WorkerSpec(binary=...)`, or `[runtimes.llamacpp]
server`), it is run the way the node runs the real one: `llama-server --version` for the
version check (it prints `version: N (COMMIT)` and the compiler, to stderr, exit 0) and
`llama-server -m F --alias A --host H --port P -c N -np S --no-kv-unified --jinja --metrics
...` for a worker. It accepts exactly the flags of llama-server (common/arg.cpp) the
adapter uses and tests pass, and rejects others with exit 1 as the real one does
(`error: invalid argument`). It serves the routes the node probes on that server:
`GET /health` (503 `{"error": {"code": 503, "message": "Loading model"}}` while
loading, then `{"status": "ok"}`), `GET /v1/models` (the alias listed), `GET /metrics`
and `POST /v1/completions`.

FAKE_LLAMACPP_MODE (from the model's env) says how to misbehave:
  serve            serve normally
  crash            print a few log lines and exit 3 at once
  hang             print a line and never listen (start-up deadline)
  crash_after:S    serve for S seconds, then exit 4
  infer_fail       serve /v1/models, but every completion answers HTTP 500
  crash_first:N    crash (exit 3) the first N starts, then serve (counts in FAKE_LLAMACPP_COUNTER)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: invalid argument: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def _server_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="llama-server", add_help=False)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-a", "--alias")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-c", "--ctx-size", type=int, default=0)
    p.add_argument("-np", "--parallel", type=int, default=-1)
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers")
    for flag in ("--kv-unified", "--no-kv-unified", "--jinja", "--no-jinja", "--metrics", "--embeddings", "--reranking"):
        p.add_argument(flag, action="store_true")
    return p.parse_args(argv)


def _handler(alias: str, infer_ok: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "llamacpp"}]})
            elif self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/metrics":
                page = b"# HELP llamacpp:requests_processing Number of requests processing.\n" \
                       b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 0\n"
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            else:
                self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/completions":
                return self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
            if not infer_ok:
                return self._json(500, {"error": {"code": 500, "message": "llama_decode failed", "type": "server_error"}})
            self._json(200, {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                             "model": body.get("model", alias),
                             "choices": [{"text": " x", "index": 0, "logprobs": None, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def log_message(self, fmt: str, *args) -> None:
            print("fake-llama-server:", fmt % args, flush=True)

    return Handler


def _crash(code: int) -> None:
    print("llama_model_load: loading model", flush=True)
    print("ggml_backend: allocating buffers", flush=True)
    print("fatal: out of memory while allocating the KV cache", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str]) -> None:
    if argv == ["--version"]:  # the node's version check
        print("version: 1 (0c1e570)\nbuilt with a fake for tests", file=sys.stderr, flush=True)
        return
    args = _server_args(argv)
    mode = os.environ.get("FAKE_LLAMACPP_MODE", "serve")
    if mode == "crash":
        _crash(3)
    if mode.startswith("crash_first:"):
        counter = Path(os.environ["FAKE_LLAMACPP_COUNTER"])
        starts = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(starts + 1))
        if starts < int(mode.split(":", 1)[1]):
            _crash(3)
    if mode == "hang":
        print("llama_model_load: loading model (this fake never finishes)", flush=True)
        while True:
            time.sleep(3600)
    server = ThreadingHTTPServer((args.host, args.port), _handler(args.alias or args.model, mode != "infer_fail"))
    print(f"fake-llama-server: serving {args.alias} on {args.host}:{args.port}", flush=True)
    if mode.startswith("crash_after:"):
        def later() -> None:
            time.sleep(float(mode.split(":", 1)[1]))
            print("fatal: segmentation fault in the fake decode loop", flush=True)
            os._exit(4)
        threading.Thread(target=later, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
