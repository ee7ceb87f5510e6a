"""Pull throughput: `infernode pull` (verified, into the store) against curl, same files, same run.

    .venv/bin/python bench/pull.py [--size-mb 1024] [--model-mb 1024] [--files 16] [--rounds 3] [--conn-mbps N]

Generates random files in a temporary folder and serves them from one loopback HTTP
server in its own process (sendfile, Range supported). Two measurements, alternated
round by round:
- one large file: `curl -o` against a pull of an `http://...#sha256=` source through
  node.supply.pull (spliced into store/partial/, hashed on another thread, fsynced,
  renamed when the digest matches);
- a model of `--files` files: one `curl` process fetching them one after another (one
  connection, reused) against a pull of an `hf:` source of those files from the same
  server (INFERNODE_PULL_CONCURRENCY at once, default 4).
Every pulled blob is re-hashed against its digest afterwards (outside the timing), and
every curl output checked for its size. `--conn-mbps` caps each connection's rate, as a
CDN edge or a long link does, which is where fetching files in parallel pays most; by
default loopback runs as fast as the CPUs let it. Prints MB/s per round, the best of each, and
the ratios. Deletes everything.
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
        start = 0
        m = re.match(r"bytes=(\d+)-$", self.headers.get("range", ""))
        if m:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("content-range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("content-length", str(size - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            offset, t0 = start, time.monotonic()
            step = size if not self.rate else max(64 * 1024, self.rate // 50)
            while offset < size:
                offset += os.sendfile(self.connection.fileno(), f.fileno(), offset, min(step, size - offset))
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


def time_pull(box: Path, models: str, name: str, entry_of: object) -> tuple[float, float]:
    """Pull model `name` into a fresh store: (seconds, CPU seconds of every thread); then re-hash (not timed)."""
    from node.config import load_config
    from node.supply.pull import pull_entry
    from node.supply.store import Store

    shutil.rmtree(box, ignore_errors=True)
    box.mkdir(parents=True)
    (box / "appliance.toml").write_text(f'[node]\ndata_dir = "data"\n\n{models}')
    cfg = load_config(str(box / "appliance.toml"))
    entry = entry_of(cfg)  # type: ignore[operator]
    store = Store(cfg.data_dir / "store")
    model = cfg.model(name)
    assert model is not None
    c, t = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    pull_entry(store, entry, model, cfg)
    dt, cpu = time.perf_counter() - t, _cpu(resource.RUSAGE_SELF) - c
    problems = store.verify(entry)
    assert not problems and len(list(store.blobs())) == len({f.sha256 for f in entry.files}), problems
    shutil.rmtree(box)
    return dt, cpu


def big_file_entry(url: str):  # type: ignore[no-untyped-def]
    """The lock entry `infernode lock` writes for an http://...#sha256= source."""
    def entry_of(cfg):  # type: ignore[no-untyped-def]
        from node.supply.lockfile import read_lock, write_lock
        from node.supply.resolve import build_lock
        write_lock(cfg.lock_path, build_lock(cfg))
        return read_lock(cfg.lock_path).entry("big")
    return entry_of


def model_entry(files: list[tuple[str, int, str]]):  # type: ignore[no-untyped-def]
    """The lock entry of an hf: model of `files` (path, size, sha256) at a fixed commit."""
    def entry_of(cfg):  # type: ignore[no-untyped-def]
        from node.supply.lockfile import LockedFile, LockEntry
        return LockEntry(name="model", source="hf:bench/model", revision="0" * 40,
                         files=[LockedFile(path=p, size=n, sha256=h) for p, n, h in files]).sealed()
    return entry_of


def main() -> None:
    global _ROOT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="the large file, MiB")
    ap.add_argument("--model-mb", type=int, default=1024, help="the model, MiB in all")
    ap.add_argument("--files", type=int, default=16, help="files in the model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conn-mbps", type=float, default=0,
                    help="cap each connection at this many MB/s (a CDN edge's per-connection rate); default: no cap")
    ap.add_argument("--serve", nargs=3, metavar=("ROOT", "PORT", "RATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]))
        return
    if not shutil.which("curl"):
        sys.exit("curl is not installed")
    work = Path(tempfile.mkdtemp(prefix="infernode-bench-pull-", dir="/tmp"))
    _ROOT = work / "srv"
    _ROOT.mkdir()
    server = None
    try:
        big = args.size_mb * 1024 * 1024
        hexd = make_file(_ROOT / "blob.bin", big)
        # A model as the Hub has them: shards of one size, the last one shorter.
        shard = args.model_mb * 1024 * 1024 // args.files
        files = []
        for i in range(args.files):
            name = f"model-{i + 1:05d}-of-{args.files:05d}.safetensors"
            n = shard if i < args.files - 1 else args.model_mb * 1024 * 1024 - shard * (args.files - 1)
            files.append((name, n, make_file(_ROOT / name, n)))
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(_ROOT), str(port),
                                   str(int(args.conn_mbps * 1e6))])
        base = f"http://127.0.0.1:{port}"
        os.environ["HF_ENDPOINT"] = base
        os.environ.pop("HF_TOKEN", None)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        import node.supply.pull
        import node.supply.remote  # noqa: F401
        big_toml = f'[[models]]\nname = "big"\nsource = "{base}/blob.bin#sha256={hexd}"\nruntime = "llamacpp"\n'
        model_toml = '[[models]]\nname = "model"\nsource = "hf:bench/model"\nruntime = "vllm"\n'
        model_urls = [f"{base}/bench/model/resolve/{'0' * 40}/{name}" for name, _, _ in files]
        mb_big, mb_model = big / 1e6, sum(n for _, n, _ in files) / 1e6
        runs: dict[str, list[tuple[float, float]]] = {}  # name -> [(MB/s, CPU seconds per GB)]

        def note(name: str, mb: float, timed: tuple[float, float]) -> str:
            runs.setdefault(name, []).append((mb / timed[0], timed[1] / mb * 1000))
            return f"{name} {runs[name][-1][0]:6.1f} MB/s"

        big_url = [f"{base}/blob.bin"]
        cap = f"each connection capped at {args.conn_mbps:g} MB/s" if args.conn_mbps else "no cap per connection"
        print(f"load average before: {os.getloadavg()[0]:.2f}; {cap}", flush=True)
        for i in range(args.rounds):
            line = [note("1 file: curl -o", mb_big, time_curl(big_url, work / "curl")),
                    note("infernode pull", mb_big, time_pull(work / "box", big_toml, "big", big_file_entry(big_url[0]))),
                    note("curl -o + fsync", mb_big, time_curl(big_url, work / "curl", fsync=True)),
                    note(f"{args.files} files: curl one after another", mb_model, time_curl(model_urls, work / "curl")),
                    note("infernode pull ", mb_model, time_pull(work / "box", model_toml, "model", model_entry(files))),
                    note("curl + fsync", mb_model, time_curl(model_urls, work / "curl", fsync=True))]
            print(f"round {i + 1}: " + " | ".join(line[:3]) + "\n         " + " | ".join(line[3:]), flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")

        def best(name: str) -> float:
            return max(r[0] for r in runs[name])

        def cpu(name: str) -> float:
            return min(r[1] for r in runs[name])

        print(f"best of {args.rounds} (MB/s), least CPU (s per GB; curl's own, or every thread of the pull), "
              f"over loopback, every pulled blob re-hashed afterwards:")
        for title, c, p, cs in ((f"1 file of {mb_big:.0f} MB", "1 file: curl -o", "infernode pull", "curl -o + fsync"),
                                (f"{args.files} files, {mb_model:.0f} MB", f"{args.files} files: curl one after another",
                                 "infernode pull ", "curl + fsync")):
            target = "0.9" if c.startswith("1 file") else "1.5"
            print(f"  {title}: curl {best(c):.1f} MB/s ({cpu(c):.2f} s/GB CPU), infernode pull {best(p):.1f} MB/s "
                  f"({cpu(p):.2f} s/GB CPU): ratio {best(p) / best(c):.2f} (target >= {target}); "
                  f"against curl + fsync {best(cs):.1f} MB/s: ratio {best(p) / best(cs):.2f}")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
