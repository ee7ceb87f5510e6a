#!/usr/bin/env python3
"""A misbehaving stand-in for the llama.cpp runtime's interpreter, for supervisor tests.

Set as `[runtimes.llamacpp] python = ".../tests/fakes/llamacpp_python.py"`, it is run the
way the node runs the real interpreter: `PY -c CODE` for the version check (handed to
the real Python) and `PY SHIM -m llama_cpp.server --model F --model_alias A --host H --port P
--n_ctx N ...` for a worker. It accepts exactly the flags of llama-cpp-python's server
that the adapter uses (llama-cpp-python docs, "OpenAI Compatible Web Server": `--model`,
`--model_alias`, `--host`, `--port`, `--n_ctx`, `--n_threads`, `--n_gpu_layers`,
`--interrupt_requests`) and rejects others like the real argparse-based server (exit 2).
It serves the routes the node probes on that server: `GET /v1/models` (the alias
listed), `GET /docs` (FastAPI's docs page, the liveness probe) and `POST /v1/completions`.

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


def _server_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llama_cpp.server")
    p.add_argument("--model", required=True)
    p.add_argument("--model_alias")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--n_ctx", type=int, default=2048)
    p.add_argument("--n_threads", type=int)
    p.add_argument("--n_gpu_layers", type=int)
    p.add_argument("--interrupt_requests", choices=["True", "False"])
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
                self._json(200, {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "me"}]})
            elif self.path == "/docs":
                page = b"<!DOCTYPE html><html><head><title>FastAPI - Swagger UI</title></head></html>"
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/completions":
                return self._json(404, {"detail": "Not Found"})
            if not infer_ok:
                return self._json(500, {"error": {"message": "llama_decode failed", "type": "internal_server_error"}})
            self._json(200, {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                             "model": body.get("model", alias),
                             "choices": [{"text": " x", "index": 0, "logprobs": None, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def log_message(self, fmt: str, *args) -> None:
            print("fake-llamacpp:", fmt % args, flush=True)

    return Handler


def _crash(code: int) -> None:
    print("llama_model_load: loading model", flush=True)
    print("ggml_backend: allocating buffers", flush=True)
    print("fatal: out of memory while allocating the KV cache", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str]) -> None:
    if argv[:1] == ["-c"]:  # the node's version check: the real interpreter answers it
        os.execv(sys.executable, [sys.executable, *argv])
    if argv[:1] and argv[0].endswith("llamacpp_usage.py"):  # the node's usage shim, which runs the server
        argv = argv[1:]
    if argv[:2] != ["-m", "llama_cpp.server"]:
        sys.exit(f"fake interpreter: unsupported invocation {argv!r}")
    args = _server_args(argv[2:])
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
    server = ThreadingHTTPServer((args.host, args.port), _handler(args.model_alias or args.model, mode != "infer_fail"))
    print(f"fake-llamacpp: serving {args.model_alias} on {args.host}:{args.port}", flush=True)
    if mode.startswith("crash_after:"):
        def later() -> None:
            time.sleep(float(mode.split(":", 1)[1]))
            print("fatal: segmentation fault in the fake decode loop", flush=True)
            os._exit(4)
        threading.Thread(target=later, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
