"""Gateway overhead benchmark: the stub worker directly vs through a real node in front.

Starts `tests/fakes/openai_worker.py` (32 streamed chunks, with usage when asked) and a
real `infernode up` with the stub as an `external` model, a key with rpm/tpm quotas
and metrics on. For >= 10 s per cell it measures, at concurrency 1 and 64, plain and
streaming chat completions, direct and through the node: requests/s, p50/p99 latency,
time to first data (streams), and the node's CPU time (utime+stime from /proc, robust
to a noisy machine) per request and per streamed chunk, and its RSS. "event loop" is
the main thread's share; the rest is the ledger's batch writer and other threads.
Then the same node cells again over HTTPS (`[node] tls_cert` from `infernode tls
selfsigned`, keep-alive connections, so the handshake is paid once per connection).

Then, with `--apis` (the default), the translated client APIs against plain
`/v1/chat/completions` on the same stub answers (32 chunks): Anthropic's `/v1/messages`,
OpenAI's `/v1/responses` and Ollama's `/api/chat`, whole and streamed, at concurrency 16:
the node's CPU per request, and the translation's added CPU per request and per
streamed event (the difference with chat completions, over the 32 upstream events).

Run: `.venv/bin/python bench/gateway.py [--duration 10] [--no-apis] [--no-tls]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.gateway.upstream import Pool  # noqa: E402  (the load generator reuses the node's lean client)

CHUNKS = 32
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """utime + stime of a process (or of one of its threads)."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> tuple[float, float]:
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def wait_http(url: str, timeout: float = 60, verify: str | None = None) -> None:
    import ssl

    import httpx
    ctx = ssl.create_default_context(cafile=verify) if verify else True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, verify=ctx).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready")


MSGS = [{"role": "user", "content": "Say something."}]
# (name, path under the node's root, request body) for each client API.
APIS = [
    ("chat", "/v1/chat/completions", lambda s: {"model": "stub-model", "messages": MSGS, "max_tokens": CHUNKS, "stream": s}),
    ("anthropic", "/v1/messages", lambda s: {"model": "stub-model", "messages": MSGS, "max_tokens": CHUNKS, "stream": s}),
    ("responses", "/v1/responses", lambda s: {"model": "stub-model", "input": MSGS, "max_output_tokens": CHUNKS,
                                              "stream": s}),
    ("ollama", "/api/chat", lambda s: {"model": "stub-model", "messages": MSGS, "options": {"num_predict": CHUNKS},
                                       "stream": s}),
]


async def run_cell(base: str, key: str, stream: bool, concurrency: int, duration: float,
                   path: str = "/chat/completions", request: dict | None = None) -> dict:
    pool = Pool(read_timeout=60)
    body = json.dumps(request or {"model": "stub-model", "messages": MSGS, "max_tokens": CHUNKS,
                                  "stream": stream}).encode()
    headers = (("content-type", "application/json"), ("authorization", f"Bearer {key}"))
    lat: list[float] = []
    ttfd: list[float] = []
    errors = 0
    chunks = 0
    stop = time.perf_counter() + duration

    async def one() -> None:
        nonlocal errors, chunks
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            resp = await pool.request("POST", base, path, body, headers)
            first = None
            try:
                async for data in resp.chunks():
                    if first is None:
                        first = time.perf_counter()
                    if stream:
                        chunks += data.count(b"\n\n")
            finally:
                resp.close()
            t1 = time.perf_counter()
            if resp.status != 200:
                errors += 1
                continue
            lat.append(t1 - t0)
            if stream and first is not None:
                ttfd.append(first - t0)

    await asyncio.gather(*(one() for _ in range(concurrency)))
    await pool.aclose()
    lat.sort()
    ttfd.sort()

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")

    return {"n": len(lat), "errors": errors, "rps": len(lat) / duration, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "ttfd50": pct(ttfd, 0.5) if stream else None, "events": chunks}


def start_node(work: Path, port: int, stub_port: int, tls: bool) -> subprocess.Popen:
    py = sys.executable
    extra = 'tls_cert = "node.crt"\ntls_key = "node.key"\n' if tls else ""
    (work / "appliance.toml").write_text(f"""
[node]
listen = "127.0.0.1:{port}"
data_dir = "data"
{extra}
[quotas.default]
rpm = 100000000
tpm = 10000000000

[[models]]
name = "stub-model"
runtime = "external"
url = "http://127.0.0.1:{stub_port}/v1"
max_inflight = 256
""")
    cfg = str(work / "appliance.toml")
    subprocess.run([py, "-m", "node", "lock", "--config", cfg], check=True, cwd=REPO, capture_output=True)
    log = (work / "node.log").open("ab")
    return subprocess.Popen([py, "-m", "node", "up", "--config", cfg], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def measure(node: subprocess.Popen, target: str, base: str, key: str, stream: bool, conc: int,
            duration: float) -> dict:
    asyncio.run(run_cell(base, key, stream, conc, 1.0))  # warm the pools
    c0, m0 = cpu_seconds(node.pid), cpu_seconds(node.pid, node.pid)
    res = asyncio.run(run_cell(base, key, stream, conc, duration))
    cpu, main_cpu = cpu_seconds(node.pid) - c0, cpu_seconds(node.pid, node.pid) - m0
    n = max(res["n"], 1)
    res.update(target=target, stream=stream, conc=conc, node_cpu_ms=cpu * 1000 / n, loop_cpu_ms=main_cpu * 1000 / n)
    print(f"  {target:8} conc={conc:<3} stream={stream!s:5} {res['rps']:8.0f} req/s p50 {res['p50']:.2f} ms",
          file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--no-apis", dest="apis", action="store_false", help="skip the translated client APIs")
    ap.add_argument("--no-tls", dest="tls", action="store_false", help="skip the HTTPS cells")
    args = ap.parse_args()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="infernode-bench-"))
    stub_port, node_port = free_port(), free_port()
    stub = subprocess.Popen([py, "-m", "tests.fakes.openai_worker", "--port", str(stub_port), "--no-record",
                             "--chunks", str(CHUNKS)], cwd=REPO)
    node = start_node(work, node_port, stub_port, tls=False)
    import httpx
    try:
        node_url = f"http://127.0.0.1:{node_port}"
        print(f"node pid {node.pid}, stub pid {stub.pid}, work dir {work}", file=sys.stderr)
        wait_http(node_url + "/readyz")
        admin = (work / "data" / "admin.key").read_text().strip()
        r = httpx.post(node_url + "/admin/v1/keys", json={"name": "bench", "rpm": 100000000, "tpm": 10000000000},
                       headers={"authorization": f"Bearer {admin}"}, timeout=10)
        r.raise_for_status()
        key = r.json()["key"]
        rows = []
        for conc in args.concurrency:
            for stream in (False, True):
                for target, base in (("direct", f"http://127.0.0.1:{stub_port}/v1"), ("node", node_url + "/v1")):
                    rows.append(measure(node, target, base, key, stream, conc, args.duration))
        rss, hwm = rss_mb(node.pid)
        apis = api_cells(node.pid, node_url, key, args.duration) if args.apis else None
        metrics = httpx.get(node_url + "/metrics", timeout=10).text
        ok = [line for line in metrics.splitlines() if line.startswith('infernode_requests_total{')]
        if args.tls:
            node.send_signal(signal.SIGTERM)
            node.wait(30)
            subprocess.run([py, "-m", "node", "tls", "selfsigned", "--out", str(work), "--name", "127.0.0.1"],
                           check=True, cwd=REPO, capture_output=True)
            os.environ["SSL_CERT_FILE"] = str(work / "node.crt")  # the load generator's default context trusts it
            node = start_node(work, node_port, stub_port, tls=True)
            tls_url = f"https://127.0.0.1:{node_port}"
            wait_http(tls_url + "/readyz", verify=str(work / "node.crt"))
            for conc in args.concurrency:
                for stream in (False, True):
                    rows.append(measure(node, "node+tls", tls_url + "/v1", key, stream, conc, args.duration))
        report(rows, rss, hwm)
        if apis is not None:
            report_apis(apis)
        print("node metrics:", "; ".join(ok))
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(30)
        stub.terminate()
        stub.wait(10)


def report(rows: list[dict], rss: float, hwm: float) -> None:
    print(f"\n{'target':9}{'conc':>5}{'stream':>7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'TTFD ms':>9}"
          f"{'node CPU ms/req':>17}{'(event loop)':>14}{'errors':>8}")
    for r in rows:
        ttfd = f"{r['ttfd50']:.2f}" if r["ttfd50"] is not None else "-"
        cpu = f"{r['node_cpu_ms']:.3f}" if r["target"] != "direct" else "-"
        loop = f"{r['loop_cpu_ms']:.3f}" if r["target"] != "direct" else "-"
        print(f"{r['target']:9}{r['conc']:>5}{str(r['stream']):>7}{r['rps']:>9.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}"
              f"{ttfd:>9}{cpu:>17}{loop:>14}{r['errors']:>8}")
    print()
    by = {(r["target"], r["conc"], r["stream"]): r for r in rows}
    for target, conc in sorted({(r["target"], r["conc"]) for r in rows if r["target"] != "direct"}):
        d, n = by[("direct", conc, False)], by[(target, conc, False)]
        ds, ns = by[("direct", conc, True)], by[(target, conc, True)]
        per_chunk = (ns["node_cpu_ms"] - n["node_cpu_ms"]) / CHUNKS
        print(f"{target} concurrency {conc}: {target}/direct req/s {n['rps'] / d['rps']:.2f} (stream {ns['rps'] / ds['rps']:.2f}); "
              f"added p50 {n['p50'] - d['p50']:+.2f} ms (stream {ns['p50'] - ds['p50']:+.2f} ms); "
              f"added TTFD {ns['ttfd50'] - ds['ttfd50']:+.2f} ms; node CPU {n['node_cpu_ms']:.3f} ms/request, "
              f"{per_chunk:.4f} ms/streamed chunk")
    print(f"node RSS {rss:.0f} MB now, {hwm:.0f} MB peak")


def api_cells(pid: int, node_url: str, key: str, duration: float, conc: int = 16) -> dict:
    """Node CPU ms per request for each client API, whole and streamed."""
    cpu = {}
    for name, path, make in APIS:
        for stream in (False, True):
            asyncio.run(run_cell(node_url, key, stream, conc, 1.0, path, make(stream)))  # warm
            c0 = cpu_seconds(pid)
            res = asyncio.run(run_cell(node_url, key, stream, conc, duration, path, make(stream)))
            if res["errors"]:
                raise SystemExit(f"{name} stream={stream}: {res['errors']} errors")
            cpu[(name, stream)] = (cpu_seconds(pid) - c0) * 1000 / max(res["n"], 1)
            print(f"  {name:9} stream={stream!s:5} {res['rps']:8.0f} req/s  {cpu[(name, stream)]:.3f} ms CPU/req",
                  file=sys.stderr)
    return cpu


def report_apis(cpu: dict) -> None:
    print(f"\n{'API':11}{'CPU ms/req':>12}{'stream':>10}{'added ms/req':>14}{'added ms/event':>16}")
    base, base_s = cpu[("chat", False)], cpu[("chat", True)]
    for name, _, _ in APIS:
        plain, streamed = cpu[(name, False)], cpu[(name, True)]
        per_event = ((streamed - plain) - (base_s - base)) / CHUNKS
        print(f"{name:11}{plain:>12.3f}{streamed:>10.3f}{plain - base:>+14.3f}{per_event:>+16.4f}")
    print("(added: versus /v1/chat/completions on the same stub answers; targets +0.05 ms/request, +0.01 ms/event)")


if __name__ == "__main__":
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    main()
