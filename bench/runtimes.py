"""llama.cpp runtimes: tokens/s of llama-server (the node's llamacpp runtime) against llama-cpp-python's server.

Both serve the default model (tiny-chat's GGUF) with the default config's threads, one at a
time on the same machine, in the same run, launched directly (no node in between):
- `llama-server` with the very argv the node's adapter builds (parallel slots included);
- `python -m llama_cpp.server` as the node launched it before (`--n_threads`, `--n_ctx 2048`,
  `--interrupt_requests False`), from an interpreter that has `llama-cpp-python[server]`
  (`--old-python`, default: this one).
Each round runs `--requests` non-streamed chat completions (`--max-tokens` each, greedy) per
client, for 1 and for 8 concurrent clients, on each runtime in turn (the order alternates
between rounds); tokens/s is completion tokens (the servers' own usage) over wall time.
Printed: the median over rounds per runtime and client count, and llama-server's ratio.

Run: `.venv/bin/python bench/runtimes.py [--rounds 3] [--threads 1] [--old-python /path/to/venv/bin/python]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import runtimes  # noqa: E402
from node.config import load_config  # noqa: E402
from runtimes import WorkerSpec  # noqa: E402
from tests.conftest import free_port, llama_server  # noqa: E402

GGUF = REPO / "node" / "builtin_models" / "tiny-chat" / "tiny-chat.gguf"
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def default_threads() -> str:
    """The threads the default config gives tiny-chat (appliance.toml's `-t`)."""
    args = load_config(REPO / "appliance.toml").models[0].args
    return runtimes.flag_value(tuple(args), "-t", "--threads") or "1"


def llama_server_argv(port: int, threads: str) -> tuple[tuple[str, ...], dict[str, str]]:
    spec = WorkerSpec(model="tiny-chat", replica=0, runtime="llamacpp", port=port, model_path=GGUF,
                      binary=str(llama_server()), args=("-t", threads))
    plan = runtimes.get("llamacpp").plan(spec)
    return plan.argv, dict(plan.env)


def old_server_argv(python: str, port: int, threads: str) -> tuple[tuple[str, ...], dict[str, str]]:
    return ((python, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", "tiny-chat",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "False",
             "--n_threads", threads), {"CUDA_VISIBLE_DEVICES": ""})


def serve(argv: tuple[str, ...], env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=2) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
            try:
                r = c.get(f"http://127.0.0.1:{port}/v1/models")
                if r.status_code == 200 and any(m.get("id") == "tiny-chat" for m in r.json().get("data", [])):
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{argv[0]} did not come up in 120 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tokens_per_s(port: int, clients: int, requests: int, max_tokens: int) -> float:
    """Completion tokens per wall second with `clients` clients sending `requests` each."""
    body = {"model": "tiny-chat", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "top_k": 1, "seed": 1}

    def client(_: int) -> int:
        got = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
            for _ in range(requests):
                r = c.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                got += r.json()["usage"]["completion_tokens"]
        return got

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per measurement")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--old-python", default=sys.executable, help="an interpreter with llama-cpp-python[server]")
    ap.add_argument("--threads", help="threads for both servers (default: the default config's -t)")
    args = ap.parse_args()
    if subprocess.run([args.old_python, "-c", "import llama_cpp.server"], capture_output=True).returncode != 0:
        sys.exit(f"{args.old_python} has no llama-cpp-python[server]; pass --old-python PATH")
    threads = args.threads or default_threads()
    launchers: dict[str, Callable[[int], tuple[tuple[str, ...], dict[str, str]]]] = {
        "llama-server": lambda port: llama_server_argv(port, threads),
        "llama-cpp-python": lambda port: old_server_argv(args.old_python, port, threads),
    }
    results: dict[tuple[str, int], list[float]] = {}
    order = list(launchers)
    for rnd in range(args.rounds):
        for name in order if rnd % 2 == 0 else order[::-1]:
            port = free_port()
            argv, env = launchers[name](port)
            proc = serve(argv, env, port)
            try:
                tokens_per_s(port, 1, 1, 8)  # warm-up
                for clients in (1, 8):
                    tps = tokens_per_s(port, clients, args.requests, args.max_tokens)
                    results.setdefault((name, clients), []).append(tps)
                    print(f"round {rnd + 1} {name:17s} {clients} client(s): {tps:8.0f} tok/s", flush=True)
            finally:
                stop(proc)
    print(f"\nmedians over {args.rounds} rounds, tiny-chat, -t {threads}, {args.max_tokens}-token answers, "
          f"{args.requests} requests per client:")
    for clients in (1, 8):
        new = statistics.median(results[("llama-server", clients)])
        old = statistics.median(results[("llama-cpp-python", clients)])
        print(f"  {clients} client(s): llama-server {new:8.0f} tok/s, llama-cpp-python {old:8.0f} tok/s, ratio {new / old:.2f}x")


if __name__ == "__main__":
    main()
