"""Stand-in for SGLang's server, `python -m sglang.launch_server`.

Follows SGLang's "Server Arguments" page (docs.sglang.io) and its HTTP server
(python/sglang/srt/entrypoints/http_server.py): a plain argparse parser (prefixes
allowed, which is why the documented `--tp 2` reaches `--tp-size`); an unknown flag
prints usage and `launch_server.py: error: unrecognized arguments: ...`, exit 2;
`--model-path` is required. The HTTP port opens at once, but `/health` and
`/health_generate` answer 503 while the server is starting (FAKE_RUNTIME_START_DELAY_S)
and 200 once a one-token generation would pass; `/get_model_info`, `/v1/models`
(the served name) and the OpenAI routes of runtime_http answer. Flags outside the subset
below are rejected even where real SGLang knows them.

Run it as SGLang runs: tests/fakes/bin/python -m sglang.launch_server ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # runtime_http sits beside this file
from runtime_http import Behaviour, Handler, Runtime, add_openai_routes, openai_error, serve  # noqa: E402

VERSION = "0.5.23+fake"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or "launch_server.py")
    p.add_argument("--model-path", required=True)
    p.add_argument("--tokenizer-path")
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tensor-parallel-size", "--tp-size", dest="tp_size", type=int, default=1)
    p.add_argument("--data-parallel-size", "--dp-size", dest="dp_size", type=int, default=1)
    p.add_argument("--mem-fraction-static", type=float)
    p.add_argument("--context-length", type=int)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--chat-template")
    p.add_argument("--max-running-requests", type=int)
    p.add_argument("--chunked-prefill-size", type=int)
    p.add_argument("--enable-metrics", action="store_true")
    p.add_argument("--log-level", default="info")
    p.add_argument("--api-key")
    p.add_argument("--random-seed", type=int)
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--attention-backend")
    p.add_argument("--skip-server-warmup", action="store_true")
    p.add_argument("--device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    model = Path(args.model_path)
    if not (model / "config.json").is_file():
        print(f"OSError: {args.model_path} does not appear to have a file named config.json", file=sys.stderr, flush=True)
        return 1
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if visible and args.tp_size * args.dp_size > len(visible):
        print(f"AssertionError: tp_size * dp_size = {args.tp_size * args.dp_size} exceeds the {len(visible)} visible GPU(s)",
              file=sys.stderr, flush=True)
        return 1
    if args.mem_fraction_static is not None and not 0 < args.mem_fraction_static < 1:
        print(f"ValueError: mem_fraction_static must be in (0, 1), got {args.mem_fraction_static}", file=sys.stderr, flush=True)
        return 1
    served = args.served_model_name or args.model_path
    rt = Runtime("sglang", Behaviour.from_env(), owned_by="sglang", max_model_len=args.context_length or 2048)
    rt.models = lambda: [served]
    rt.log(f"[sglang {VERSION}] server_args={vars(args)}")

    def not_found(h: Handler, name: str) -> None:
        openai_error(h, 404, f"The model '{name}' does not exist", "NotFoundError")

    def health(h: Handler) -> None:
        h.send_bytes(200 if rt.healthy() else 503, b"")

    routes = {("GET", "/health"): health, ("GET", "/health_generate"): health,
              ("GET", "/get_model_info"): lambda h: h.send_json(200, {"model_path": args.model_path, "is_generation": True}),
              ("GET", "/get_server_info"): lambda h: h.send_json(200, {"version": VERSION, **vars(args)})}
    if args.enable_metrics:
        routes[("GET", "/metrics")] = lambda h: h.send_bytes(200, b'sglang:num_running_reqs{model_name="%s"} 0.0\n'
                                                             % served.encode(), "text/plain; version=0.0.4")
    add_openai_routes(routes, not_found)
    return serve(rt, args.host, args.port, routes, bind_after_load=False)


if __name__ == "__main__":
    sys.exit(main())
