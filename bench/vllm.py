"""vLLM's own benchmark client (`vllm bench serve`) against vLLM directly and through the node.

Starts a real `infernode up` whose one model is the tiny built-in model on the real vLLM
CPU build (`runtime = "vllm"`, `[runtimes.vllm] python` pointing at the environment
`.ci/setup-vllm.sh` makes; `--enforce-eager --max-model-len 512`,
`VLLM_CPU_OMP_THREADS_BIND=0`, `VLLM_CPU_KVCACHE_SPACE=1`), so the node's path is the one a
vLLM user has (the runtime's own usage chunk, no counting or synthesis) and both arms
talk to the same vLLM process: "direct" to the worker's port, "node" to the node's port
with a key. Then, in one process of the vLLM environment (vLLM imports once, not once per
round), it runs vLLM's benchmark (openai-chat backend, random dataset, 64 input and 32
output tokens, `--ignore-eos`, 300 prompts, concurrency 8) in alternating rounds, direct
first, each round on prompts of its own seed (so vLLM's prefix cache favours no round),
and prints per round: req/s, median TTFT, median time per output token (TPOT) and mean
inter-token latency (ITL; its median is ~0 here: the client often reads several events at
once, direct as through the node), and the CPU seconds
the node, vLLM (its api server, engine core and worker) and the benchmark client took;
then the medians and the node/direct ratios, and how long the node, vLLM's API server
and the client were runnable but waiting for a CPU per request (`/proc` schedstat). Last, a small aiohttp client that reads
like vLLM's (`iter_any`) counts what one streamed request delivers, direct and through
the node: reads, SSE events, body bytes, and the bytes and TCP segments on the wire
(`TCP_INFO`), figures the machine's load does not change much. The load average is
printed with each round: on a shared machine, compare runs only at a similar load.

Run: `.venv/bin/python bench/vllm.py [--rounds 4] [--prompts 300] [--vllm-python .venv-vllm/bin/python]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HF_DIR = REPO / "node" / "builtin_models" / "tiny-chat" / "hf"
MODEL = "tiny-vllm"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the orchestrator (the node's environment) ----------------------------------------

def node_config(port: int, vllm_python: Path, worker_nice: int | None) -> str:
    supervisor = f"[supervisor]\nworker_nice = {worker_nice}\n" if worker_nice is not None else ""
    return f"""
[node]
listen = "127.0.0.1:{port}"
data_dir = "data"

{supervisor}
[quotas.default]
rpm = 100000000
tpm = 10000000000

[runtimes.vllm]
python = "{vllm_python}"

[[models]]
name = "{MODEL}"
source = "builtin:tiny-chat#hf/*"
runtime = "vllm"
args = ["--enforce-eager", "--max-model-len", "512"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "0", HF_HUB_OFFLINE = "1" }}
startup_timeout_s = 900
"""


def start_node(work: Path, port: int, vllm_python: Path, worker_nice: int | None) -> subprocess.Popen:
    py = sys.executable
    (work / "appliance.toml").write_text(node_config(port, vllm_python, worker_nice))
    cfg = str(work / "appliance.toml")
    subprocess.run([py, "-m", "node", "lock", "--config", cfg], check=True, cwd=REPO, capture_output=True)
    log = (work / "node.log").open("ab")
    return subprocess.Popen([py, "-m", "node", "up", "--config", cfg], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_worker(node: subprocess.Popen, url: str, admin: str, timeout: float) -> dict:
    """The ready vLLM replica's status (port, pid), once the node routes to it."""
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise SystemExit(f"the node exited with {node.returncode}")
        try:
            r = httpx.get(url + "/admin/v1/workers", headers={"authorization": f"Bearer {admin}"}, timeout=5)
            ws = r.json().get("data") or [] if r.status_code == 200 else []
            if ws and ws[0]["state"] == "ready" and httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return ws[0]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"vLLM was not ready through the node within {timeout:.0f} s")


def orchestrate(args: argparse.Namespace) -> None:
    import httpx
    vllm_python = Path(args.vllm_python).absolute()
    if not vllm_python.exists():
        raise SystemExit(f"{vllm_python} is missing: run `bash .ci/setup-vllm.sh` (or pass --vllm-python)")
    work = Path(tempfile.mkdtemp(prefix="infernode-bench-vllm-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = start_node(work, port, vllm_python, args.worker_nice)
    print(f"node pid {node.pid}, work dir {work}; waiting for vLLM (about a minute on two cores)", file=sys.stderr)
    try:
        for _ in range(600):
            if (work / "data" / "admin.key").exists():
                break
            time.sleep(0.5)
        admin = (work / "data" / "admin.key").read_text().strip()
        worker = wait_worker(node, url, admin, args.startup_timeout)
        r = httpx.post(url + "/admin/v1/keys", json={"name": "bench", "rpm": 100000000, "tpm": 10000000000},
                       headers={"authorization": f"Bearer {admin}"}, timeout=10)
        r.raise_for_status()
        plan = {"targets": {"direct": f"http://127.0.0.1:{worker['port']}", "node": url},
                "key": r.json()["key"], "node_pid": node.pid, "vllm_pid": worker["pid"],
                "rounds": args.rounds, "prompts": args.prompts, "concurrency": args.concurrency,
                "input_len": args.input_len, "output_len": args.output_len, "warmup": args.warmup}
        group = Path(f"/proc/{worker['pid']}/autogroup")   # the keeper sets it from [supervisor] worker_nice
        if group.exists():
            print(f"vLLM's session: {group.read_text().strip()}", file=sys.stderr)
        rows_path = plan["rows"] = str(work / "rounds.jsonl")
        subprocess.run([str(vllm_python), str(Path(__file__).resolve()), "--client"], input=json.dumps(plan),
                       text=True, cwd=work, check=True)
        rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines()]
        report(rows)
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def report(rows: list[dict]) -> None:
    wire = [r for r in rows if "probe" in r]
    rows = [r for r in rows if "probe" not in r]
    print(f"\n{'round':>5} {'target':7}{'req/s':>8}{'TTFT ms':>9}{'TPOT ms':>9}{'ITL ms':>8}{'wall s':>8}"
          f"{'node CPU s':>11}{'vLLM CPU s':>11}{'client CPU s':>13}{'load':>6}{'failed':>7}")
    for r in rows:
        print(f"{r['round']:>5} {r['target']:7}{r['rps']:>8.1f}{r['ttft']:>9.1f}{r['tpot']:>9.2f}{r['itl']:>8.2f}{r['wall']:>8.1f}"
              f"{r['cpu_node']:>11.2f}{r['cpu_vllm']:>11.2f}{r['cpu_client']:>13.2f}{r['load']:>6.1f}{r['failed']:>7}")
    med = {t: {k: statistics.median(r[k] for r in rows if r["target"] == t)
               for k in ("rps", "ttft", "tpot", "itl", "cpu_node", "cpu_vllm", "cpu_client", "wait_node", "wait_api",
                         "wait_client")} for t in ("direct", "node")}
    d, n = med["direct"], med["node"]
    print(f"\nmedians of the rounds: direct {d['rps']:.1f} req/s, TTFT {d['ttft']:.1f} ms, TPOT {d['tpot']:.2f} ms, "
          f"ITL {d['itl']:.2f} ms; node {n['rps']:.1f} req/s, TTFT {n['ttft']:.1f} ms, TPOT {n['tpot']:.2f} ms, "
          f"ITL {n['itl']:.2f} ms")
    print(f"node/direct throughput {n['rps'] / d['rps']:.2f}x (target >= 0.90x); "
          f"added median TTFT {n['ttft'] - d['ttft']:+.1f} ms (target <= +5 ms)")
    print(f"CPU s per round (median): node {n['cpu_node']:.2f}; vLLM {d['cpu_vllm']:.2f} direct, "
          f"{n['cpu_vllm']:.2f} through the node; client {d['cpu_client']:.2f} direct, {n['cpu_client']:.2f} through the node")
    print("time runnable but waiting for a CPU, ms per request (median of the rounds; /proc schedstat): "
          f"node {n['wait_node']:.2f} through the node ({d['wait_node']:.2f} idle during direct rounds); "
          f"vLLM's API server {d['wait_api']:.2f} direct, {n['wait_api']:.2f} through the node; "
          f"client {d['wait_client']:.2f} direct, {n['wait_client']:.2f} through the node")
    if wire:
        print("\nper streamed request, as an aiohttp client reading like vLLM's receives it (160 requests, same concurrency):")
        print(f"{'target':8}{'reads':>7}{'events':>8}{'body B':>8}{'wire B':>8}{'TCP segments':>14}")
        for w in wire:
            print(f"{w['probe']:8}{w['reads']:>7.1f}{w['events']:>8.1f}{w['body']:>8.0f}{w['wire']:>8.0f}"
                  f"{w['segments']:>14.1f}")


# -- the benchmark client (the vLLM environment; imports nothing of the node) ---------

def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_wait(pids: list[int]) -> float:
    """Seconds the processes' threads spent runnable but waiting for a CPU (/proc/PID/task/TID/schedstat)."""
    ns = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                ns += int(task.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return ns / 1e9


def tree(pid: int) -> list[int]:
    """A process and its descendants (vLLM: api server -> EngineCore -> Worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return out


def tcp_received(sock: socket.socket) -> tuple[int, int]:
    """(bytes received, segments received) on a connection: struct tcp_info's tcpi_bytes_received, tcpi_segs_in."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("Q", info, 128)[0], struct.unpack_from("I", info, 140)[0]


async def wire(base: str, key: str | None, plan: dict, requests: int = 160) -> dict:
    """What a client reading like vLLM's (aiohttp, `iter_any`) receives per streamed request: reads, SSE
    events, body bytes, and the bytes and TCP segments on the wire; independent of the machine's load."""
    import aiohttp
    conc = plan["concurrency"]
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * plan["input_len"]}],
               "max_completion_tokens": plan["output_len"], "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    n = {"reads": 0, "events": 0, "body": 0}
    socks: dict[int, socket.socket] = {}
    gate = asyncio.Semaphore(conc)

    async def one(session: aiohttp.ClientSession) -> None:
        async with gate, session.post(base + "/v1/chat/completions", json=payload, headers=headers) as r:
            if r.connection is not None:
                sock = r.connection.transport.get_extra_info("socket")
                socks[sock.fileno()] = sock
            async for data in r.content.iter_any():
                n["reads"] += 1
                n["events"] += data.count(b"\n\n")
                n["body"] += len(data)

    connector = aiohttp.TCPConnector(limit=conc, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(conc)))  # open the connections
        before = {fd: tcp_received(s) for fd, s in socks.items()}
        n.update(reads=0, events=0, body=0)
        await asyncio.gather(*(one(session) for _ in range(requests)))
        after = {fd: tcp_received(s) for fd, s in socks.items()}
    got = [tuple(a - b for a, b in zip(after[fd], before.get(fd, (0, 0)))) for fd in after]
    return {"reads": n["reads"] / requests, "events": n["events"] / requests, "body": n["body"] / requests,
            "wire": sum(g[0] for g in got) / requests, "segments": sum(g[1] for g in got) / requests}


def client(plan: dict) -> None:
    import importlib.metadata as metadata
    real_version = metadata.version

    def version(name: str) -> str:  # the distribution is vllm-cpu; vLLM asks for "vllm"
        return real_version("vllm-cpu" if name == "vllm" else name)

    metadata.version = version
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", here)]  # this file is named vllm.py too
    sys.modules.pop("vllm", None)
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_pids = tree(plan["vllm_pid"])

    def bench(base: str, seed: int, prompts: int) -> dict:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args([
            "--backend", "openai-chat", "--base-url", base, "--endpoint", "/v1/chat/completions",
            "--model", MODEL, "--tokenizer", str(HF_DIR), "--dataset-name", "random",
            "--random-input-len", str(plan["input_len"]), "--random-output-len", str(plan["output_len"]),
            "--ignore-eos", "--num-prompts", str(prompts), "--max-concurrency", str(plan["concurrency"]),
            "--seed", str(seed), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl",
            "--ready-check-timeout-sec", "60"])
        with contextlib.redirect_stdout(sys.stderr):  # vLLM's own report: our stdout is the summary
            return main(args)

    def use(target: str) -> None:
        if target == "node":
            os.environ["OPENAI_API_KEY"] = plan["key"]  # vLLM's client sends it as a bearer token
        else:
            os.environ.pop("OPENAI_API_KEY", None)

    for target, base in plan["targets"].items():  # connections, tokenizer and caches warm on both paths
        use(target)
        bench(base, 1000, plan["warmup"])
    for i in range(plan["rounds"]):
        for j, (target, base) in enumerate(plan["targets"].items()):
            use(target)
            c0 = (proc_cpu(plan["node_pid"]), sum(proc_cpu(p) for p in vllm_pids), sum(os.times()[:2]))
            w0 = (run_wait([plan["node_pid"]]), run_wait(vllm_pids[:1]), run_wait([os.getpid()]))
            t0 = time.monotonic()
            res = bench(base, 2 * i + j, plan["prompts"])
            wall = time.monotonic() - t0
            c1 = (proc_cpu(plan["node_pid"]), sum(proc_cpu(p) for p in vllm_pids), sum(os.times()[:2]))
            w1 = (run_wait([plan["node_pid"]]), run_wait(vllm_pids[:1]), run_wait([os.getpid()]))
            done = max(res["completed"], 1)
            row = {"round": i + 1, "target": target, "rps": res["request_throughput"], "ttft": res["median_ttft_ms"],
                   "tpot": res["median_tpot_ms"], "itl": res["mean_itl_ms"], "wall": wall, "failed": plan["prompts"] - res["completed"],
                   "cpu_node": c1[0] - c0[0], "cpu_vllm": c1[1] - c0[1], "cpu_client": c1[2] - c0[2],
                   "wait_node": (w1[0] - w0[0]) * 1000 / done, "wait_api": (w1[1] - w0[1]) * 1000 / done,
                   "wait_client": (w1[2] - w0[2]) * 1000 / done,
                   "load": os.getloadavg()[0]}
            with open(plan["rows"], "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"round {i + 1} {target}: {row['rps']:.1f} req/s, TTFT {row['ttft']:.1f} ms", file=sys.stderr)
    for target, base in plan["targets"].items():
        row = {"probe": target, **asyncio.run(wire(base, plan["key"] if target == "node" else None, plan))}
        with open(plan["rows"], "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per target, alternating, direct first")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=32, help="prompts per target before the rounds, not counted")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--worker-nice", type=int, default=None,
                    help="the node's [supervisor] worker_nice (0-19; default: the node's default, 5; 0 shows the issue)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the vLLM-side half, plan on stdin
    args = ap.parse_args()
    if args.client:
        client(json.load(sys.stdin))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
