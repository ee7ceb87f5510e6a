"""Pull throughput: `infernode pull` (verified, into the store) against curl, same files, same run.

    .venv/bin/python bench/pull.py [--cases capped,uncapped] [--conn-mbps 32] [--rounds 2]
                                   [--models 16] [--model-mb 64] [--big-mb 1024] [--uncapped-mb 2048]

Generates random files in a temporary folder and serves them from loopback: nginx when it
is installed (`--server nginx`, the default when found: one server block whose every
connection is capped with `limit_rate`, as a CDN edge caps it, and one without a cap),
else a Python server in its own process that sleeps to hold each connection to the cap.
Measurements, each alternating curl and the pull round by round:
- capped: `--models` models of one `--model-mb` file each (`http://...#sha256=` sources),
  one curl process fetching them one after another against one pull of all of them;
  and one `--big-mb` file, `curl -o` against a pull of it (byte ranges on several
  connections);
- uncapped: one `--uncapped-mb` file, `curl -o` against a pull of it.
Every pulled blob is re-hashed against its digest afterwards (outside the timing), and
every curl output checked for its size. Prints MB/s per round, the best of each, and the
ratios. INFERNODE_PULL_CONCURRENCY applies as in `infernode pull` (default 8). Deletes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Files(BaseHTTPRequestHandler):
    """Serves ROOT/<last path segment>: `/blob.bin`, or `/org/m/resolve/<rev>/<file>` as the Hub has it."""

    protocol_version = "HTTP/1.1"
    root = Path(".")
    rate = 0  # bytes/s per connection; 0: as fast as loopback goes

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.root / self.path.rsplit("/", 1)[-1]
        size = path.stat().st_size
        start, end = 0, size
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("range", ""))
        if m:
            start, end = int(m.group(1)), min(size, int(m.group(2) or size - 1) + 1)
            self.send_response(206)
            self.send_header("content-range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("accept-ranges", "bytes")
        self.send_header("content-length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            offset, t0 = start, time.monotonic()
            step = end if not self.rate else max(64 * 1024, self.rate // 50)
            while offset < end:
                offset += os.sendfile(self.connection.fileno(), f.fileno(), offset, min(step, end - offset))
                if self.rate:  # a link that carries `rate` bytes/s per connection, as a CDN edge may
                    time.sleep(max(0.0, t0 + (offset - start) / self.rate - time.monotonic()))

    do_HEAD = do_GET


def serve(root: str, port: int, rate: int) -> None:
    _Files.root, _Files.rate = Path(root), rate
    ThreadingHTTPServer(("127.0.0.1", port), _Files).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_file(path: Path, size: int) -> str:
    """`size` bytes, varied and cheap to make; returns their sha256."""
    h = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    with path.open("wb") as f:
        i = 0
        while size > 0:
            chunk = (block[i % 997:] + block[:i % 997])[:size]
            f.write(chunk)
            h.update(chunk)
            size -= len(chunk)
            i += 1
    return h.hexdigest()


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def time_curl(urls: list[str], out: Path, fsync: bool = False) -> tuple[float, float]:
    """One curl process fetching `urls` one after another (`-o` each): (seconds, its CPU seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["curl", "-sS", "--fail"]
    for i, url in enumerate(urls):
        args += ["-o", str(out / f"{i}.out"), url]
    c, t = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(args, check=True)
    if fsync:  # what the store does before its rename: the bytes on disk, not only in the page cache
        for i in range(len(urls)):
            fd = os.open(out / f"{i}.out", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    dt, cpu = time.perf_counter() - t, _cpu(resource.RUSAGE_CHILDREN) - c
    for i, url in enumerate(urls):
        served = _served_path(url)
        assert (out / f"{i}.out").stat().st_size == served.stat().st_size, f"curl: short {url}"
    shutil.rmtree(out)
    return dt, cpu


_ROOT = Path(".")


def _served_path(url: str) -> Path:
    return _ROOT / url.rsplit("/", 1)[-1]


def time_pull(box: Path, models: str, names: list[str]) -> tuple[float, float]:
    """Lock, then pull models `names` into a fresh store in one pull: (seconds, CPU seconds of every thread)."""
    from node.config import load_config
    from node.supply.lockfile import read_lock, write_lock
    from node.supply.pull import pull_entries
    from node.supply.resolve import build_lock
    from node.supply.store import Store

    shutil.rmtree(box, ignore_errors=True)
    box.mkdir(parents=True)
    (box / "appliance.toml").write_text(f'[node]\ndata_dir = "data"\n\n{models}')
    cfg = load_config(str(box / "appliance.toml"))
    write_lock(cfg.lock_path, build_lock(cfg))
    lock = read_lock(cfg.lock_path)
    jobs = [(lock.entry(n), cfg.model(n)) for n in names]
    store = Store(cfg.data_dir / "store")
    c, t = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    results = pull_entries(store, jobs, cfg)  # type: ignore[arg-type]
    dt, cpu = time.perf_counter() - t, _cpu(resource.RUSAGE_SELF) - c
    bad = [r for r in results if isinstance(r, BaseException)]
    assert not bad, bad
    for entry, _ in jobs:
        problems = store.verify(entry)  # type: ignore[union-attr]
        assert not problems, problems
    shutil.rmtree(box)
    return dt, cpu


NGINX_CONF = """daemon off; worker_processes 2; pid {work}/nginx.pid; error_log {work}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; default_type application/octet-stream; client_body_temp_path {work}/tmp;
  proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{ listen 127.0.0.1:{capped}; root {root}; limit_rate {rate}; }}
  server {{ listen 127.0.0.1:{free}; root {root}; }}
}}
"""


def start_servers(kind: str, root: Path, work: Path, rate: int) -> tuple[list[subprocess.Popen], int, int]:
    """(processes, capped port, uncapped port): nginx, or this file's Python server twice."""
    capped, free = free_port(), free_port()
    if kind == "nginx":
        (work / "tmp").mkdir(exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, root=root, capped=capped, free=free, rate=rate))
        procs = [subprocess.Popen([shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(work)])]
    else:
        procs = [subprocess.Popen([sys.executable, __file__, "--serve", str(root), str(port), str(r)])
                 for port, r in ((capped, rate), (free, 0))]
    for port in (capped, free):
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
    return procs, capped, free


def main() -> None:
    global _ROOT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="capped,uncapped")
    ap.add_argument("--models", type=int, default=16, help="one-file models pulled at once (capped case)")
    ap.add_argument("--model-mb", type=int, default=64, help="each model's file, MiB")
    ap.add_argument("--big-mb", type=int, default=1024, help="the one large file of the capped case, MiB")
    ap.add_argument("--uncapped-mb", type=int, default=2048, help="the one file of the uncapped case, MiB")
    ap.add_argument("--conn-mbps", type=int, default=32, help="each capped connection's rate, MiB/s (nginx's `limit_rate 32m`)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--server", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--serve", nargs=3, metavar=("ROOT", "PORT", "RATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]))
        return
    if not shutil.which("curl"):
        sys.exit("curl is not installed")
    kind = args.server if args.server != "auto" else ("nginx" if shutil.which("nginx") else "python")
    cases = set(args.cases.split(","))
    work = Path(tempfile.mkdtemp(prefix="infernode-bench-pull-", dir="/tmp"))
    os.chmod(work, 0o755)
    _ROOT = work / "srv"
    _ROOT.mkdir()
    os.chmod(_ROOT, 0o755)
    procs: list[subprocess.Popen] = []
    try:
        files: dict[str, tuple[int, str]] = {}
        if "capped" in cases:
            for i in range(args.models):
                files[f"m{i}.bin"] = (args.model_mb * MiB, make_file(_ROOT / f"m{i}.bin", args.model_mb * MiB))
            files["big.bin"] = (args.big_mb * MiB, make_file(_ROOT / "big.bin", args.big_mb * MiB))
        if "uncapped" in cases:
            files["huge.bin"] = (args.uncapped_mb * MiB, make_file(_ROOT / "huge.bin", args.uncapped_mb * MiB))
        for name in files:
            os.chmod(_ROOT / name, 0o644)
        procs, capped, free = start_servers(kind, _ROOT, work, args.conn_mbps * MiB)
        import node.supply.pull
        import node.supply.remote  # noqa: F401

        def toml(port: int, names: list[str]) -> str:
            return "".join(f'[[models]]\nname = "{n.removesuffix(".bin")}"\nsource = "http://127.0.0.1:{port}/{n}'
                           f'#sha256={files[n][1]}"\nruntime = "llamacpp"\n' for n in names)

        measures = []  # (title, curl urls, pull toml, model names, MB)
        if "capped" in cases:
            ms = [f"m{i}.bin" for i in range(args.models)]
            measures.append((f"{args.models} one-file models of {args.model_mb} MiB, capped",
                             [f"http://127.0.0.1:{capped}/{n}" for n in ms], toml(capped, ms),
                             [n.removesuffix(".bin") for n in ms], sum(files[n][0] for n in ms) / 1e6))
            measures.append((f"1 file of {args.big_mb} MiB, capped", [f"http://127.0.0.1:{capped}/big.bin"],
                             toml(capped, ["big.bin"]), ["big"], files["big.bin"][0] / 1e6))
        if "uncapped" in cases:
            measures.append((f"1 file of {args.uncapped_mb} MiB, uncapped", [f"http://127.0.0.1:{free}/huge.bin"],
                             toml(free, ["huge.bin"]), ["huge"], files["huge.bin"][0] / 1e6))
        print(f"server: {kind}; capped connections at {args.conn_mbps} MiB/s; load average before: "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        runs: dict[tuple[str, str], list[float]] = {}
        for i in range(args.rounds):
            for title, urls, models, names, mb in measures:
                c = time_curl(urls, work / "curl")
                p = time_pull(work / "box", models, names)
                runs.setdefault((title, "curl"), []).append(mb / c[0])
                runs.setdefault((title, "pull"), []).append(mb / p[0])
                print(f"round {i + 1}: {title}: curl {mb / c[0]:7.1f} MB/s | infernode pull {mb / p[0]:7.1f} MB/s "
                      f"({p[1] / mb * 1000:.2f} s/GB CPU)", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print(f"best of {args.rounds} (MB/s), every pulled blob re-hashed afterwards:")
        for title, *_ in measures:
            c, p = max(runs[(title, "curl")]), max(runs[(title, "pull")])
            target = "0.9" if "uncapped" in title else "4"
            print(f"  {title}: curl {c:.1f}, infernode pull {p:.1f}: ratio {p / c:.2f} (target >= {target})")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


MiB = 1024 * 1024

if __name__ == "__main__":
    main()
