"""`pull` against the local Hub and registry fakes: resume, retries, bad bytes, full disk, races."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from node.config import load_config
from node.supply.download import NetSettings, RemoteError
from node.supply.lockfile import read_lock, write_lock
from node.supply.progress import JsonProgress
from node.supply.pull import pull_entry
from node.supply.resolve import build_lock
from node.supply.store import DigestMismatch, DiskFull, SizeMismatch, Store
from runtimes import ModelLayout
from tests.conftest import INFERNODE, REPO, run_cli, wait_until
from tests.fakes.hf_hub import FakeHub

FAST = NetSettings(parallel=3, retries=4, backoff_s=0.01, stall_timeout_s=1.0)
WEIGHTS = os.urandom(3 * 1024 * 1024 + 17)
TOKENIZER = b'{"version": "1.0"}'


def model_toml(source: str, name: str = "m") -> str:
    return f'[[models]]\nname = "{name}"\nsource = "{source}"\nruntime = "llamacpp"\n'


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub().start()
    h.commit("org/tiny", {"model.Q4.gguf": WEIGHTS, "model.Q8.gguf": WEIGHTS[::-1], "tokenizer.json": TOKENIZER,
                          ".gitattributes": b"*.gguf filter=lfs\n"})
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield h
    h.stop()


def setup_box(tmp_path: Path, models: str):
    (tmp_path / "appliance.toml").write_text(f'[node]\nname = "t"\ndata_dir = "data"\nlisten = "127.0.0.1:1"\n\n{models}')
    cfg = load_config(str(tmp_path / "appliance.toml"))
    write_lock(cfg.lock_path, build_lock(cfg))
    return cfg, read_lock(cfg.lock_path), Store(cfg.data_dir / "store")


def pull(cfg, lock, store, name="m", settings=FAST, progress=None):
    from node.supply import remote
    from node.supply.resolve import source_of
    model, entry = cfg.model(name), lock.entry(name)
    src = source_of(model, cfg)
    remote.pull(store, entry, src, settings=settings, progress=progress)
    return entry


def test_pull_hf_by_commit_verified_and_viewed(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    entry = lock.entry("m")
    res = pull_entry(store, entry, cfg.model("m"), cfg)
    assert (res.fetched, res.present) == (1, 0)
    assert store.verify(entry) == []
    gguf = store.model_path(entry, ModelLayout.GGUF_FILE)
    assert gguf.name == "model.Q4.gguf" and gguf.read_bytes() == WEIGHTS
    # Downloads go by the locked commit, never by the branch name, and through the CDN redirect.
    resolves = [s.path for s in hub.seen if "/resolve/" in s.path]
    assert resolves == [f"/org/tiny/resolve/{entry.revision}/model.Q4.gguf"]
    assert any(s.path.startswith("/cdn/") for s in hub.seen)
    again = pull_entry(store, entry, cfg.model("m"), cfg)
    assert (again.fetched, again.present) == (0, 1)


def test_resume_after_drop_mid_file_uses_range(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    hexd = lock.entry("m").files[0].sha256
    hub.faults.drop_after[hexd] = 1_000_000
    entry = pull(cfg, lock, store)
    assert store.verify(entry) == []
    ranges = [s.range for s in hub.seen if s.path == f"/cdn/{hexd}"]
    assert ranges[0] is None and ranges[1] == "bytes=1000000-", ranges


def test_retries_5xx_and_stall_then_succeeds(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    hexd = lock.entry("m").files[0].sha256
    hub.faults.errors_5xx[hexd] = 2
    hub.faults.stall_s[hexd] = 3.0  # longer than the 1 s stall timeout: the read times out, then resumes
    entry = pull(cfg, lock, store)
    assert store.verify(entry) == []
    cdn = [s for s in hub.seen if s.path == f"/cdn/{hexd}"]
    assert len(cdn) >= 4 and cdn[-1].range is not None and cdn[-1].range.startswith("bytes=")


def test_gives_up_after_retries_naming_file(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    hub.faults.errors_5xx[lock.entry("m").files[0].sha256] = 100
    with pytest.raises(RemoteError, match=r"model\.Q4\.gguf: .*gave up after 4 retries.*HTTP 503"):
        pull(cfg, lock, store)
    assert not store.has(lock.entry("m").files[0])


def test_server_ignoring_range_restarts_cleanly(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    hexd = lock.entry("m").files[0].sha256
    hub.faults.drop_after[hexd] = 500_000
    hub.faults.ignore_range = True
    out = io.StringIO()
    entry = pull(cfg, lock, store, progress=JsonProgress(out, interval_s=0))
    assert store.verify(entry) == []
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    # The bytes thrown away when the server ignored Range are taken back from the count.
    assert max(e["done"] for e in events) == len(WEIGHTS)
    assert events[-1] == {"event": "done", "file": "m/model.Q4.gguf", "total": len(WEIGHTS), "done": len(WEIGHTS)}


def test_corrupt_byte_deletes_partial_and_names_digests(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    f = lock.entry("m").files[0]
    hub.faults.corrupt.add(f.sha256)
    with pytest.raises(DigestMismatch) as err:
        pull(cfg, lock, store)
    msg = err.value.message
    assert "model.Q4.gguf" in msg and f"expected sha256:{f.sha256}" in msg and "got sha256:" in msg
    assert not store.has(f) and not list(store.partial_dir.iterdir())


def test_wrong_size_is_refused_and_nothing_left(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    f = lock.entry("m").files[0]
    hub.faults.extra_bytes[f.sha256] = 10
    with pytest.raises(SizeMismatch, match=f"the server has {f.size + 10} bytes, models.lock pins {f.size}"):
        pull(cfg, lock, store)
    assert not store.has(f) and not list(store.partial_dir.iterdir())


def test_full_disk_fails_cleanly(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    small = cfg.data_dir / "store"
    small.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a 2 MB tmpfs here (needs root or CAP_SYS_ADMIN); no honest ENOSPC otherwise")
    try:
        # The free-space check refuses up front ...
        with pytest.raises(DiskFull, match=r"needs 3\.1 MB free .* available"):
            pull(cfg, lock, store)
        # ... and when the disk fills during the write (space taken by someone else after
        # the check), ENOSPC deletes the partial: nothing half-written stays visible.
        store.check_space = lambda needed: None  # type: ignore[method-assign]
        with pytest.raises(DiskFull, match="disk full"):
            pull(cfg, lock, store, settings=NetSettings(parallel=1, retries=0))
        assert not store.has(lock.entry("m").files[0])
        assert not store.partial_dir.exists() or not list(store.partial_dir.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_full_disk_during_a_parallel_pull_leaves_nothing_half_written(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny"))
    small = cfg.data_dir / "store"
    small.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(small)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a 5 MB tmpfs here (needs root or CAP_SYS_ADMIN); no honest ENOSPC otherwise")
    try:
        store.check_space = lambda needed: None  # type: ignore[method-assign]  # as if space went after the check
        hub.faults.rate_bps = 8 * 1024 * 1024  # the two 3 MB files overlap, together more than 5 MB
        with pytest.raises(DiskFull, match="disk full"):
            pull(cfg, lock, store, settings=NetSettings(parallel=3, retries=0))
        assert not store.partial_dir.exists() or not list(store.partial_dir.iterdir())
        entry = lock.entry("m")
        blobs = {b.name for b in store.blobs()}
        assert blobs < {f.sha256 for f in entry.files}  # not everything fitted ...
        assert all(store.rehash(f) is None for f in entry.files if f.sha256 in blobs)  # ... what is there is whole
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_concurrent_pulls_of_one_blob(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    hub.faults.rate_bps = 8 * 1024 * 1024  # slow enough that the pulls overlap
    errors: list[BaseException] = []

    def one() -> None:
        try:
            pull(cfg, lock, Store(cfg.data_dir / "store"))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert store.verify(lock.entry("m")) == []
    assert not list(store.partial_dir.iterdir())
    # The blob was fetched once; the others waited on the lock and found it done.
    assert len([s for s in hub.seen if s.path.startswith("/cdn/")]) == 1


def test_parallel_pull_resumes_every_file_after_the_process_is_killed(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*.gguf"))
    files = lock.entry("m").files
    assert len(files) == 2
    hub.faults.rate_bps = 1024 * 1024
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen(INFERNODE + ["pull", "--json", "--config", str(cfg.path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partials = [store.partial_dir / f.sha256 for f in files]
    try:  # both files arriving at once, both part-way
        assert wait_until(lambda: all(p.exists() and p.stat().st_size > 500_000 for p in partials), timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    had = {f.sha256: (store.partial_dir / f.sha256).stat().st_size for f in files}
    assert all(0 < n < f.size for f, n in zip(files, had.values()))
    assert not any(store.has(f) for f in files)
    hub.faults.rate_bps = None
    p = run_cli("pull", "--json", config=cfg.path, env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    starts = {e["file"]: e["done"] for e in events if e["event"] == "start"}
    assert starts == {f"m/{f.path}": had[f.sha256] for f in files}
    assert events[-1]["event"] == "model" and events[-1]["fetched"] == 2
    assert {e["file"] for e in events if e["event"] == "done"} == set(starts)
    for f in files:  # each resumed where its own partial stopped
        assert [s.range for s in hub.seen if s.path == f"/cdn/{f.sha256}"][-1] == f"bytes={had[f.sha256]}-"
    assert store.verify(lock.entry("m")) == [] and not list(store.partial_dir.iterdir())


def test_digest_mismatch_in_one_file_leaves_the_others_intact(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny"))
    entry = lock.entry("m")
    bad = next(f for f in entry.files if f.path == "model.Q8.gguf")
    hub.faults.corrupt.add(bad.sha256)
    with pytest.raises(DigestMismatch, match="model.Q8.gguf: digest mismatch"):
        pull(cfg, lock, store)
    good = [f for f in entry.files if f is not bad]
    assert len(good) == 2 and all(store.has(f) and store.rehash(f) is None for f in good)
    assert not store.has(bad) and not list(store.partial_dir.iterdir())
    hub.faults.corrupt.clear()
    seen = len(hub.seen)
    pull(cfg, lock, store)  # the next pull fetches only the bad one
    assert store.verify(entry) == []
    assert [s.path for s in hub.seen[seen:] if s.path.startswith("/cdn/")] == [f"/cdn/{bad.sha256}"]


def test_pull_url_source_and_cli_verify(tmp_path, hub):
    hexd = hashlib.sha256(WEIGHTS).hexdigest()
    cfg, lock, store = setup_box(tmp_path, model_toml(f"{hub.url}/cdn/{hexd}#sha256={hexd}"))
    assert lock.entry("m").files[0].size == len(WEIGHTS)
    p = run_cli("pull", config=cfg.path)
    assert p.returncode == 0, p.stderr
    assert "1 fetched" in p.stdout
    assert run_cli("verify", config=cfg.path).returncode == 0


def test_cli_pull_reports_each_failure_and_exits_1(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
    hub.faults.corrupt.add(lock.entry("m").files[0].sha256)
    p = run_cli("pull", config=cfg.path, env={"HF_ENDPOINT": hub.url, "INFERNODE_PULL_RETRIES": "1"})
    assert p.returncode == 1
    assert "digest mismatch" in p.stderr and "model.Q4.gguf" in p.stderr and "Traceback" not in p.stderr


def test_resume_after_node_killed_mid_pull(node_factory, tmp_path, hub):
    """`infernode up` pulls what is missing before launch; SIGKILL it mid-file, then resume."""
    models = model_toml("hf:org/tiny#*Q4.gguf", name="big")
    hub.faults.rate_bps = 1024 * 1024
    node = node_factory(models, ready=False, env={"HF_ENDPOINT": hub.url})
    lock = read_lock(node.config.parent / "models.lock")
    f = lock.entry("big").files[0]
    partial = node.data_dir / "store" / "partial" / f.sha256
    try:
        assert wait_until(lambda: partial.exists() and partial.stat().st_size > 500_000, timeout=90), \
            node.log.read_text()[-2000:]
    finally:
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
    had = partial.stat().st_size
    assert had < f.size
    hub.faults.rate_bps = None
    p = run_cli("pull", "--json", config=node.config, env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 0, p.stderr
    start = next(json.loads(line) for line in p.stdout.splitlines() if '"start"' in line)
    assert start["done"] == had
    assert [s.range for s in hub.seen if s.path.startswith("/cdn/")][-1] == f"bytes={had}-"
    assert run_cli("verify", config=node.config).returncode == 0


def test_ctrl_c_stops_a_pull_promptly_and_keeps_the_partial(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*.gguf"))
    hub.faults.rate_bps = 256 * 1024  # 12 s a file: far longer than the wait below
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen(INFERNODE + ["pull", "--json", "--config", str(cfg.path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partials = lambda: [p for p in store.partial_dir.iterdir() if p.stat().st_size > 200_000] \
        if store.partial_dir.is_dir() else []
    try:
        assert wait_until(lambda: len(partials()) == 2, timeout=60)  # both files downloading in parallel
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=5)  # not after the remaining megabytes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130
    assert len(partials()) == 2 and not any(store.has(f) for f in lock.entry("m").files)
