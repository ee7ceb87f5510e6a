"""models.lock: round trip, digest over the whole entry, tamper detection, staleness."""

from __future__ import annotations

import pytest

from node.errors import ConfigError
from node.supply.lockfile import LockedFile, LockEntry, LockFile, read_lock, write_lock
from tests.conftest import run_cli, write_config

F = LockedFile(path="a.gguf", size=3, sha256="a" * 64)


def test_round_trip_and_sorted(tmp_path):
    p = tmp_path / "models.lock"
    lock = LockFile(models=[LockEntry(name="z", source="file:z", revision="r", files=[F]),
                            LockEntry(name="a", source="file:a", revision="r", files=[F])])
    write_lock(p, lock)
    back = read_lock(p)
    assert [e.name for e in back.models] == ["a", "z"]
    assert all(e.digest.startswith("sha256:") and e.digest == e.compute_digest() for e in back.models)
    assert p.read_text().startswith("# Written by `infernode lock`")


def test_digest_covers_files_and_revision():
    e = LockEntry(name="a", source="s", revision="r", files=[F]).sealed()
    assert e.sealed().digest == e.digest
    assert e.model_copy(update={"revision": "r2"}).compute_digest() != e.digest
    f2 = F.model_copy(update={"size": 4})
    assert e.model_copy(update={"files": [f2]}).compute_digest() != e.digest


def test_hand_edit_is_detected(tmp_path):
    p = tmp_path / "models.lock"
    write_lock(p, LockFile(models=[LockEntry(name="a", source="s", revision="r", files=[F])]))
    p.write_text(p.read_text().replace("size = 3", "size = 4"))
    with pytest.raises(ConfigError) as e:
        read_lock(p)
    assert "models[0].digest" in e.value.message and "infernode lock" in e.value.message


def test_bad_sha_rejected(tmp_path):
    p = tmp_path / "models.lock"
    p.write_text('version = 1\n[[models]]\nname="a"\nsource="s"\nrevision="r"\ndigest=""\n'
                 '[[models.files]]\npath="x"\nsize=1\nsha256="../../etc/passwd"\n')
    with pytest.raises(ConfigError):
        read_lock(p)


def test_missing_lock_is_empty(tmp_path):
    assert read_lock(tmp_path / "models.lock").models == []


def test_lock_check_reports_stale(tmp_path):
    cfg = write_config(tmp_path, '[[models]]\nname = "tiny"\nsource = "builtin:tiny-chat#*.gguf"\nruntime = "llamacpp"\n')
    assert run_cli("lock", "--check", config=cfg).returncode == 1
    run_cli("lock", config=cfg, check=True)
    assert run_cli("lock", "--check", config=cfg).returncode == 0
    cfg.write_text(cfg.read_text().replace("#*.gguf", "#hf/*"))
    p = run_cli("lock", "--check", config=cfg)
    assert p.returncode == 1 and "source is 'builtin:tiny-chat#hf/*'" in p.stderr
