"""Pulls at line rate: every model at once under one connection limit, large files as byte ranges.

Against the loopback Hub and registry fakes, whose blob server honours `Range: bytes=N-M`,
counts the bytes it serves and the bodies it sends at once, and caps each connection's rate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from node.supply import segments
from node.supply.download import NetSettings, SettingsError
from node.supply.progress import JsonProgress
from node.supply.pull import pull_entries
from node.supply.store import DigestMismatch, DiskFull, SizeMismatch
from tests.conftest import INFERNODE, REPO, run_cli, wait_until
from tests.fakes.hf_hub import FakeHub
from tests.test_pull import model_toml, pull, setup_box

MiB = 1024 * 1024
BIG = os.urandom(5 * MiB + 7)
RANGED = NetSettings(parallel=4, retries=3, backoff_s=0.01, stall_timeout_s=2.0, min_segment=256 * 1024)


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub().start()
    h.commit("org/big", {"weights.bin": BIG, "config.json": b'{"a": 1}'})
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield h
    h.stop()


def cdn(hub, hexd):
    return [s for s in hub.seen if s.path == f"/cdn/{hexd}"]


def test_a_large_file_comes_as_ranges_over_several_connections(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/big"))
    f = next(x for x in lock.entry("m").files if x.path == "weights.bin")
    hub.faults.rate_bps = 4 * MiB  # per connection: the ranges overlap in time
    out = io.StringIO()
    entry = pull(cfg, lock, store, settings=RANGED, progress=JsonProgress(out, interval_s=0))
    assert store.verify(entry) == [] and not list(store.partial_dir.iterdir())
    assert hub.served[f.sha256] == f.size  # every byte once
    ranges = [s.range for s in cdn(hub, f.sha256)]
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges)
    assert len(ranges) > 4 and starts[0] == 0 and all(r.count("-") == 1 and not r.endswith("-") for r in ranges)
    assert hub.peak_sending == RANGED.parallel  # the limit, reached and never passed
    # Only the probe went through the Hub's redirect; the other ranges went straight to the CDN.
    resolves = [s for s in hub.seen if s.path.endswith("/resolve/" + entry.revision + "/weights.bin")]
    assert len(resolves) == 1 and resolves[0].range == ranges[0]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    mine = [e for e in events if e["file"] == "m/weights.bin"]
    assert mine[0]["event"] == "start" and mine[-1] == {"event": "done", "file": "m/weights.bin", "total": f.size, "done": f.size}
    assert [e["done"] for e in mine[1:-1]] == sorted(e["done"] for e in mine[1:-1])


def test_every_model_at_once_largest_first_under_one_limit(tmp_path, hub, monkeypatch):
    sizes = {"a": 900_000, "b": 2_900_000, "c": 1_900_000, "d": 400_000}
    blobs = {name: os.urandom(n) for name, n in sizes.items()}
    for name, data in blobs.items():
        hub.commit(f"org/{name}", {"w.bin": data})
    hub.faults.rate_bps = 2 * MiB
    cfg, lock, store = setup_box(tmp_path, "".join(model_toml(f"hf:org/{n}", name=n) for n in sizes))
    monkeypatch.setenv("INFERNODE_PULL_CONCURRENCY", "3")
    jobs = [(lock.entry(n), cfg.model(n)) for n in sizes]
    results = pull_entries(store, jobs, cfg)
    assert [(r.model, r.fetched) for r in results] == [(n, 1) for n in sizes]  # type: ignore[union-attr]
    assert all(store.verify(e) == [] for e, _ in jobs)
    assert hub.peak_sending == 3  # four models, three connections in all
    order = [s.path.removeprefix("/cdn/") for s in hub.seen if s.path.startswith("/cdn/")]
    by_size = sorted(sizes, key=lambda n: -sizes[n])
    digests = [hashlib.sha256(blobs[n]).hexdigest() for n in by_size]
    assert set(order[:3]) == set(digests[:3]) and order[3] == digests[3]  # largest first: the smallest waited


def test_kill_mid_pull_then_resume_fetches_only_what_was_not_saved(tmp_path, hub):
    data = os.urandom(24 * MiB + 5)
    hub.commit("org/huge", {"w.bin": data})
    hexd = hashlib.sha256(data).hexdigest()
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/huge"))
    f = lock.entry("m").files[0]
    state = segments.state_path(store, f)
    hub.faults.rate_bps = 3 * MiB
    env = {**os.environ, "HF_ENDPOINT": hub.url, "INFERNODE_PULL_SEGMENT_MIB": "1", "INFERNODE_PULL_CONCURRENCY": "6"}
    proc = subprocess.Popen(INFERNODE + ["pull", "--json", "--config", str(cfg.path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:  # killed once a third of the file is saved as arrived, spread over several ranges
        assert wait_until(lambda: segments.had(store, f) > f.size // 3, timeout=60), proc.stderr.read1().decode()  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = segments.load(state, f)
    assert saved is not None and not store.has(f)
    had = sum(s.done for s in saved)
    assert f.size // 3 < had < f.size and sum(1 for s in saved if s.done) > 1
    hub.faults.rate_bps = None
    assert wait_until(lambda: hub.sending == 0, timeout=10)  # the dead client's connections, ended server-side too
    hub.served.clear()
    p = run_cli("pull", "--json", config=cfg.path, env={"HF_ENDPOINT": hub.url, "INFERNODE_PULL_SEGMENT_MIB": "1"})
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert next(e for e in events if e["event"] == "start")["done"] == had
    assert hub.served[hexd] == f.size - had  # what was saved on disk was not fetched again
    assert events[-1]["event"] == "model" and events[-1]["fetched"] == 1
    assert store.rehash(f) is None and not list(store.partial_dir.iterdir())


def test_corrupt_range_fails_the_digest_and_keeps_nothing(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/big#weights.bin"))
    f = lock.entry("m").files[0]
    hub.faults.corrupt.add(f.sha256)  # the range holding the middle byte carries one flipped byte
    with pytest.raises(DigestMismatch, match=rf"weights.bin: digest mismatch: expected sha256:{f.sha256}, got sha256:"):
        pull(cfg, lock, store, settings=RANGED)
    assert not store.has(f) and not list(store.partial_dir.iterdir())  # neither the bytes nor their state
    # Retrying: which range was bad cannot be known (one digest covers the file): it all comes again.
    hub.faults.corrupt.clear()
    hub.served.clear()
    pull(cfg, lock, store, settings=RANGED)
    assert store.rehash(f) is None and hub.served[f.sha256] == f.size


def test_wrong_total_in_content_range_is_refused(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/big#weights.bin"))
    f = lock.entry("m").files[0]
    hub.faults.extra_bytes[f.sha256] = 10
    with pytest.raises(SizeMismatch, match=f"the server has {f.size + 10} bytes, models.lock pins {f.size}"):
        pull(cfg, lock, store, settings=RANGED)
    assert not store.has(f) and not list(store.partial_dir.iterdir())


def test_server_without_range_gets_one_connection(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/big#weights.bin"))
    f = lock.entry("m").files[0]
    hub.faults.ignore_range = True
    hub.faults.drop_after[f.sha256] = 2 * MiB  # and the one stream is dropped midway, then restarted
    out = io.StringIO()
    entry = pull(cfg, lock, store, settings=RANGED, progress=JsonProgress(out, interval_s=0))
    assert store.verify(entry) == [] and not list(store.partial_dir.iterdir())
    assert hub.peak_sending == 1  # the probe's 200 was taken as the file: no second connection
    assert hub.served[f.sha256] == 2 * MiB + f.size
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert max(e["done"] for e in events) == f.size  # bytes thrown away are taken back from the count
    assert events[-1] == {"event": "done", "file": "m/weights.bin", "total": f.size, "done": f.size}


def test_full_disk_fails_before_any_range_is_fetched(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/big#weights.bin"))
    small = cfg.data_dir / "store"
    small.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot mount a 4 MB tmpfs here (needs root or CAP_SYS_ADMIN); no honest ENOSPC otherwise")
    try:
        store.check_space = lambda needed: None  # type: ignore[method-assign]  # as if space went after the check
        with pytest.raises(DiskFull, match=r"weights.bin: disk full in .*free space and pull again"):
            pull(cfg, lock, store, settings=RANGED)
        f = lock.entry("m").files[0]
        assert not store.has(f) and not list(store.partial_dir.iterdir())
        assert not cdn(hub, f.sha256)  # the preallocation failed: nothing was asked of the server
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_memory_stays_bounded_whatever_the_file_size(tmp_path, hub):
    data = os.urandom(192 * MiB)
    hub.commit("org/heavy", {"w.bin": data})
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/heavy"))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "INFERNODE_PULL_SEGMENT_MIB": "8"}
    t0 = time.monotonic()
    proc = subprocess.Popen(INFERNODE + ["pull", "--json", "--config", str(cfg.path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # VmHWM: the child's own peak since its exec (rusage's ru_maxrss would count the fork of
    # this test process, which holds the file); read until the process is gone.
    peak_kib = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone, or a zombie
            status = (Path("/proc") / str(proc.pid) / "status").read_text()
            peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
    print(f"peak RSS of `infernode pull` of a 192 MiB file in 8 MiB ranges: {peak_kib / 1024:.0f} MiB "
          f"({time.monotonic() - t0:.1f} s)")
    assert len(cdn(hub, lock.entry("m").files[0].sha256)) > 8
    assert 0 < peak_kib < 96 * 1024, peak_kib  # the interpreter, its imports, one hash window: not the file
    assert store.rehash(lock.entry("m").files[0]) is None


def test_an_unreadable_segment_state_starts_the_file_over(tmp_path, hub):
    cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/big#weights.bin"))
    f = lock.entry("m").files[0]
    store.partial_dir.mkdir(parents=True)
    (store.partial_dir / f.sha256).write_bytes(b"\0" * f.size)  # a preallocated partial ...
    segments.state_path(store, f).write_text('{"size": 1, "segments": [[0, 9, 99]]}')  # ... and a state not its own
    assert segments.had(store, f) == 0
    pull(cfg, lock, store, settings=RANGED)
    assert store.rehash(f) is None and hub.served[f.sha256] == f.size
    assert not list(store.partial_dir.iterdir())


def test_pull_concurrency_from_the_config_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERNODE_PULL_CONCURRENCY", raising=False)
    assert NetSettings.from_env().parallel == 8
    assert NetSettings.from_env(5).parallel == 5  # [node] pull_concurrency
    monkeypatch.setenv("INFERNODE_PULL_CONCURRENCY", "12")
    assert NetSettings.from_env(5).parallel == 12  # the variable wins
    monkeypatch.setenv("INFERNODE_PULL_SEGMENT_MIB", "0")
    with pytest.raises(SettingsError, match="INFERNODE_PULL_SEGMENT_MIB='0': must be a whole number from 1 to 4096"):
        NetSettings.from_env()
    (tmp_path / "appliance.toml").write_text('[node]\npull_concurrency = 0\n')
    p = run_cli("lock", config=tmp_path / "appliance.toml")
    assert p.returncode == 2 and "pull_concurrency" in p.stderr and "Traceback" not in p.stderr
