"""Pull throughput: `infernode pull` (verified, into the store) against `curl -o`, same file, same run.

    .venv/bin/python bench/pull.py [--size-mb 1024] [--rounds 3]

Generates a random file in a temporary folder, serves it from a loopback HTTP server in
its own process (sendfile, Range supported), then alternates `curl -o` and a pull of an
`http://...#sha256=` source through node.pull (hashing while writing, atomic rename).
Prints MB/s of each round, the best of each, and the ratio pull/curl. Deletes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
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
    protocol_version = "HTTP/1.1"
    root = Path(".")

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.root / self.path.lstrip("/")
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
            offset = start
            while offset < size:
                offset += os.sendfile(self.connection.fileno(), f.fileno(), offset, size - offset)

    do_HEAD = do_GET


def serve(root: str, port: int) -> None:
    _Files.root = Path(root)
    ThreadingHTTPServer(("127.0.0.1", port), _Files).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_file(path: Path, size_mb: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    with path.open("wb") as f:
        for i in range(size_mb):
            chunk = block[i % 997:] + block[:i % 997]  # varied, cheap to make
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def time_curl(url: str, out: Path, fsync: bool = False) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(out), url], check=True)
    if fsync:  # what the store does before its rename: the bytes are on disk, not only in cache
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    dt = time.perf_counter() - t
    out.unlink()
    return dt


def time_pull(url: str, hexd: str, box: Path) -> float:
    from node.config import load_config
    from node.supply.lockfile import read_lock, write_lock
    from node.supply.pull import pull_entry
    from node.supply.resolve import build_lock

    shutil.rmtree(box, ignore_errors=True)
    box.mkdir(parents=True)
    (box / "appliance.toml").write_text(f'[node]\ndata_dir = "data"\n\n[[models]]\nname = "big"\n'
                                        f'source = "{url}#sha256={hexd}"\nruntime = "llamacpp"\n')
    cfg = load_config(str(box / "appliance.toml"))
    write_lock(cfg.lock_path, build_lock(cfg))
    entry = read_lock(cfg.lock_path).entry("big")
    from node.supply.store import Store
    store = Store(cfg.data_dir / "store")
    t = time.perf_counter()
    pull_entry(store, entry, cfg.model("big"), cfg)
    dt = time.perf_counter() - t
    assert store.has(entry.files[0])
    shutil.rmtree(box)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if not shutil.which("curl"):
        sys.exit("curl is not installed")
    work = Path(tempfile.mkdtemp(prefix="infernode-bench-pull-", dir="/tmp"))
    server = None
    try:
        hexd = make_file(work / "blob.bin", args.size_mb)
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(work), str(port)])
        url = f"http://127.0.0.1:{port}/blob.bin"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        mb = args.size_mb * 1024 * 1024 / 1e6
        import node.supply.pull  # noqa: F401  (imports are not download time)
        import node.supply.remote  # noqa: F401
        curl, synced, pull = [], [], []
        for i in range(args.rounds):
            curl.append(mb / time_curl(url, work / "curl.out"))
            pull.append(mb / time_pull(url, hexd, work / "box"))
            synced.append(mb / time_curl(url, work / "curl.out", fsync=True))
            print(f"round {i + 1}: curl -o {curl[-1]:7.1f} MB/s | infernode pull (sha256, fsync) {pull[-1]:7.1f} MB/s"
                  f" | curl -o + fsync {synced[-1]:7.1f} MB/s", flush=True)
        print(f"best of {args.rounds}, {mb:.0f} MB over loopback: curl -o {max(curl):.1f} MB/s, "
              f"infernode pull {max(pull):.1f} MB/s, ratio {max(pull) / max(curl):.2f} "
              f"(against curl -o + fsync {max(synced):.1f} MB/s: ratio {max(pull) / max(synced):.2f})")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
