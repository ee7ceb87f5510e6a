"""The content-addressed store: BlobWriter, verify, races, and `up` refusing bad bytes."""

from __future__ import annotations

import hashlib
import os
import threading

import httpx
import pytest

from node.errors import StoreError
from node.supply.lockfile import LockedFile, LockEntry, read_lock
from node.supply.store import DigestMismatch, SizeMismatch, Store
from tests.conftest import TINY_MODEL, run_cli, wait_until, write_config

DATA = os.urandom(2 * 1024 * 1024 + 3)


def locked(data: bytes = DATA, path: str = "w.gguf") -> LockedFile:
    return LockedFile(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def test_blob_becomes_visible_only_when_verified(tmp_path):
    store, f = Store(tmp_path), locked()
    with store.writer(f) as w:
        w.write(DATA[:1000])
        assert not store.has(f) and (store.partial_dir / f.sha256).stat().st_size == 1000
        w.write(DATA[1000:])
        final = w.commit()
    assert final == store.blob_path(f.sha256) and final.read_bytes() == DATA
    assert final.stat().st_mode & 0o777 == 0o444
    assert not (store.partial_dir / f.sha256).exists()


def test_partial_is_resumed_where_it_stopped(tmp_path):
    store, f = Store(tmp_path), locked()
    with store.writer(f) as w:
        w.write(DATA[:12345])
    with store.writer(f) as w:
        assert w.offset == 12345  # the partial bytes were hashed once, and are kept
        w.write(DATA[12345:])
        w.commit()
    assert store.verify(LockEntry(name="m", source="x", revision="r", files=[f])) == []


def test_mismatch_deletes_partial_and_names_file_expected_actual(tmp_path):
    store, f = Store(tmp_path), locked()
    bad = bytearray(DATA)
    bad[100] ^= 1
    with pytest.raises(DigestMismatch) as err, store.writer(f) as w:
        w.write(bytes(bad))
        w.commit()
    assert err.value.message.startswith("w.gguf: digest mismatch: ")
    assert f"expected sha256:{f.sha256}" in err.value.message
    assert f"got sha256:{hashlib.sha256(bad).hexdigest()}" in err.value.message
    assert not (store.partial_dir / f.sha256).exists() and not store.has(f)


def test_more_bytes_than_locked_is_refused(tmp_path):
    store, f = Store(tmp_path), locked()
    with pytest.raises(SizeMismatch, match="more bytes than the"), store.writer(f) as w:
        w.write(DATA + b"x")
    assert not (store.partial_dir / f.sha256).exists()


def test_blob_paths_accept_only_sha256_hex(tmp_path):
    with pytest.raises(StoreError, match="not a sha256 digest"):
        Store(tmp_path).blob_path("../../etc/passwd")


def test_two_writers_of_one_blob_never_interleave(tmp_path):
    store, f = Store(tmp_path), locked()
    inside = threading.Event()
    order: list[str] = []

    def first() -> None:
        with store.writer(f) as w:
            inside.set()
            w.write(DATA[: len(DATA) // 2])
            threading.Event().wait(0.3)  # the second writer must wait for our lock meanwhile
            w.write(DATA[len(DATA) // 2:])
            w.commit()
            order.append("first committed")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with store.writer(f) as w:
        order.append("second entered")
        assert w.present and w.offset == 0  # it finds the finished blob and writes nothing
    t.join()
    assert order == ["first committed", "second entered"]
    assert store.blob_path(f.sha256).read_bytes() == DATA
    assert not list(store.partial_dir.iterdir())


def test_verify_names_each_bad_file(tmp_path):
    store = Store(tmp_path)
    good, other = locked(), locked(b"tokenizer", "tok.json")
    for f, data in ((good, DATA), (other, b"tokenizer")):
        with store.writer(f) as w:
            w.write(data)
            w.commit()
    entry = LockEntry(name="m", source="x", revision="r", files=[good, other, locked(b"gone", "gone.bin")])
    corrupt(store, good)  # flips a byte (writing a fixed one missed when the random data already held it)
    problems = [str(p) for p in store.verify(entry)]
    assert len(problems) == 2
    assert problems[0].startswith(f"w.gguf: digest mismatch: expected sha256:{good.sha256}, got sha256:")
    assert problems[1] == "gone.bin: missing from the store; run `infernode pull`"


def test_cli_verify_exits_1_naming_bad_file(tmp_path):
    cfg = write_config(tmp_path, TINY_MODEL)
    run_cli("lock", config=cfg, check=True)
    run_cli("pull", config=cfg, check=True)
    assert run_cli("verify", config=cfg).returncode == 0
    entry = read_lock(tmp_path / "models.lock").entry("tiny-chat")
    corrupt(Store(tmp_path / "data" / "store"), entry.files[0])
    p = run_cli("verify", config=cfg)
    assert p.returncode == 1
    assert f"tiny-chat: {entry.files[0].path}: digest mismatch: expected sha256:{entry.files[0].sha256}" in p.stderr
    # The bad copy is moved aside, so the next pull fetches it again and all is well.
    assert "moved to" in p.stderr and (tmp_path / "data" / "store" / "quarantine" / entry.files[0].sha256).is_file()
    pulled = run_cli("pull", config=cfg)
    assert pulled.returncode == 0 and "1 fetched" in pulled.stdout, pulled.stderr
    assert run_cli("verify", config=cfg).returncode == 0


def corrupt(store: Store, f: LockedFile) -> None:
    blob = store.blob_path(f.sha256)
    os.chmod(blob, 0o644)  # the store keeps blobs read-only
    with blob.open("r+b") as fh:
        fh.seek(f.size // 2)
        b = fh.read(1)
        fh.seek(f.size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    os.chmod(blob, 0o444)


def test_up_holds_a_corrupt_model_and_starts_the_others(node_factory, tmp_path):
    d = tmp_path / "box"
    d.mkdir()
    (d / "junk").mkdir()
    (d / "junk" / "bad.gguf").write_bytes(os.urandom(4096))
    models = TINY_MODEL + '\n[[models]]\nname = "bad"\nsource = "file:junk#*.gguf"\nruntime = "llamacpp"\n'
    cfg = write_config(d, models)
    run_cli("lock", config=cfg, check=True)
    run_cli("pull", config=cfg, check=True)
    bad = read_lock(d / "models.lock").entry("bad").files[0]
    corrupt(Store(d / "data" / "store"), bad)
    node = node_factory(models, dir=d, ready=False)

    def held() -> dict | None:
        try:
            r = httpx.get(node.url + "/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        text = r.text
        return r if r.status_code == 503 and "bad" in text and "store does not match models.lock" in text else None

    r = wait_until(held, timeout=60)
    assert r, node.log.read_text()[-3000:]
    assert f"bad.gguf: digest mismatch: expected sha256:{bad.sha256}" in r.text
    assert wait_until(lambda: any(w["model"] == "tiny-chat" and w["state"] == "ready" for w in node.workers()), timeout=90)
    bad_workers = [w for w in node.workers() if w["model"] == "bad"]
    assert bad_workers and all(w["state"] == "failed" for w in bad_workers)
    assert "store does not match models.lock" in node.log.read_text()


def test_hashing_and_splicing_fall_back_where_the_filesystem_cannot(tmp_path, monkeypatch):
    """A filesystem without mmap or splice (some FUSE and network ones) still gets verified blobs."""
    import mmap as mmap_mod

    def no_mmap(*a, **k):
        raise OSError(19, "No such device")  # what mmap says on a filesystem that has none

    def no_splice(*a, **k):
        raise OSError(22, "Invalid argument")  # what splice says when the file cannot take it

    store, f = Store(tmp_path), locked()
    monkeypatch.setattr(mmap_mod, "mmap", no_mmap)
    with store.writer(f) as w:
        w.append(DATA[:100_000])
        w.hash_through(w.offset)
        r, wr = os.pipe()
        os.write(wr, DATA[100_000:150_000])
        real_splice = os.splice
        monkeypatch.setattr(os, "splice", no_splice)
        w.splice_in(r, 50_000)
        monkeypatch.setattr(os, "splice", real_splice)
        os.close(r)
        os.close(wr)
        w.append(DATA[150_000:])
        w.commit()
    assert store.blob_path(f.sha256).read_bytes() == DATA
