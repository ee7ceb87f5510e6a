"""Air-gapped bundles: export lock + blobs, import into an empty store with no network."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from node.config import load_config
from node.supply.bundle import export_bundle, read_bundle_lock
from node.supply.lockfile import read_lock
from node.supply.store import Store
from runtimes import ModelLayout
from tests.conftest import run_cli
from tests.fakes.hf_hub import FakeHub
from tests.fakes.ollama_registry import FakeRegistry

GGUF = os.urandom(300_000)


@pytest.fixture
def online_box(tmp_path: Path):
    """A box that locked and pulled an hf:, an ollama: and a builtin: model from the fakes."""
    hub, reg = FakeHub().start(), FakeRegistry().start()
    hub.commit("org/tiny", {"tiny.gguf": GGUF, "config.json": b'{"a": 1}'})
    reg.push("library/tiny", "latest", [("application/vnd.ollama.image.model", GGUF[::-1])])
    box = tmp_path / "online"
    box.mkdir()
    (box / "appliance.toml").write_text(f"""
[node]
name = "online"
data_dir = "data"
listen = "127.0.0.1:1"

[[models]]
name = "hf-model"
source = "hf:org/tiny"
runtime = "vllm"

[[models]]
name = "ol-model"
source = "ollama:tiny"
runtime = "ollama"
registry = "{reg.url}"

[[models]]
name = "tiny-chat"
source = "builtin:tiny-chat#*.gguf"
runtime = "llamacpp"
""")
    env = {"HF_ENDPOINT": hub.url}
    run_cli("lock", config=box / "appliance.toml", env=env, check=True)
    run_cli("pull", config=box / "appliance.toml", env=env, check=True)
    yield box
    hub.stop()
    reg.stop()


def offline_copy(online: Path, tmp_path: Path) -> Path:
    """A fresh box with the same appliance.toml and models.lock and an empty store."""
    box = tmp_path / "offline"
    box.mkdir()
    for name in ("appliance.toml", "models.lock"):
        shutil.copy(online / name, box / name)
    return box


def test_export_then_import_into_empty_store_offline(online_box, tmp_path):
    out = tmp_path / "models.bundle.tar"
    p = run_cli("bundle", "export", str(out), config=online_box / "appliance.toml", check=True)
    assert "3 models" in p.stdout
    assert {e.name for e in read_bundle_lock(out).models} == {"hf-model", "ol-model", "tiny-chat"}
    box = offline_copy(online_box, tmp_path)
    # The fakes are stopped at teardown only; point every network source at nothing to prove no network.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    p = run_cli("pull", "--from", str(out), config=box / "appliance.toml", env=env)
    assert p.returncode == 0, p.stderr
    assert run_cli("verify", config=box / "appliance.toml").returncode == 0
    cfg = load_config(str(box / "appliance.toml"))
    lock = read_lock(cfg.lock_path)
    store = Store(cfg.data_dir / "store")
    root = store.model_path(lock.entry("ol-model"), ModelLayout.OLLAMA_TREE)
    assert (root / lock.entry("ol-model").files[0].path).is_file()
    assert (store.model_path(lock.entry("hf-model"), ModelLayout.HF_FOLDER) / "tiny.gguf").read_bytes() == GGUF


def test_import_from_an_extracted_folder(online_box, tmp_path):
    out = tmp_path / "b.tar"
    run_cli("bundle", "export", str(out), config=online_box / "appliance.toml", check=True)
    folder = tmp_path / "extracted"
    with tarfile.open(out) as tar:
        tar.extractall(folder, filter="data")
    box = offline_copy(online_box, tmp_path)
    p = run_cli("pull", "hf-model", "--from", str(folder), config=box / "appliance.toml")
    assert p.returncode == 0, p.stderr
    assert "hf-model: 2 fetched" in p.stdout


def test_tampered_bundle_is_refused_naming_the_file(online_box, tmp_path):
    cfg = load_config(str(online_box / "appliance.toml"))
    lock = read_lock(cfg.lock_path)
    out = tmp_path / "b.tar"
    export_bundle(Store(cfg.data_dir / "store"), lock, out)
    f = next(f for f in lock.entry("hf-model").files if f.path == "tiny.gguf")
    with tarfile.open(out) as tar:
        at = tar.getmember(f"blobs/sha256/{f.sha256}").offset_data + 1000
    with out.open("r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 1]))
    box = offline_copy(online_box, tmp_path)
    p = run_cli("pull", "hf-model", "--from", str(out), config=box / "appliance.toml")
    assert p.returncode == 1
    assert "tiny.gguf: digest mismatch: expected sha256:" + f.sha256 in p.stderr.replace("\n", "")
    store = Store(box / "data" / "store")
    assert not store.has(f) and not list(store.partial_dir.iterdir())


def test_bundle_for_another_lock_says_why(online_box, tmp_path):
    cfg = load_config(str(online_box / "appliance.toml"))
    lock = read_lock(cfg.lock_path)
    out = tmp_path / "b.tar"
    only_builtin = lock.model_copy(update={"models": [lock.entry("tiny-chat")]})
    export_bundle(Store(cfg.data_dir / "store"), only_builtin, out)
    box = offline_copy(online_box, tmp_path)
    p = run_cli("pull", "hf-model", "--from", str(out), config=box / "appliance.toml")
    assert p.returncode == 1 and "is not in" in p.stderr and "the model is not in it" in p.stderr


def test_export_refuses_an_incomplete_store(tmp_path):
    (tmp_path / "appliance.toml").write_text('[node]\ndata_dir = "data"\n\n[[models]]\nname = "t"\n'
                                             'source = "builtin:tiny-chat#*.gguf"\nruntime = "llamacpp"\n')
    run_cli("lock", config=tmp_path / "appliance.toml", check=True)
    p = run_cli("bundle", "export", str(tmp_path / "b.tar"), config=tmp_path / "appliance.toml")
    assert p.returncode == 1 and "run `infernode pull` first" in p.stderr
    assert not (tmp_path / "b.tar").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_link_member_is_refused_in_one_line(online_box, tmp_path, kind):
    """A bundle whose blob is a symbolic or hard link (to a missing or an outside file) dies with one clear line."""
    cfg = load_config(str(online_box / "appliance.toml"))
    lock = read_lock(cfg.lock_path)
    entry = lock.entry("tiny-chat")
    good = tmp_path / "good.tar"
    export_bundle(Store(cfg.data_dir / "store"), lock.model_copy(update={"models": [entry]}), good)
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            if m.name.startswith("blobs/"):
                link = tarfile.TarInfo(m.name)
                link.type, link.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "blobs/nowhere"
                out.addfile(link)
            else:
                out.addfile(m, src.extractfile(m))
    box = offline_copy(online_box, tmp_path)
    p = run_cli("pull", "tiny-chat", "--from", str(bad), config=box / "appliance.toml")
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    word = "symbolic link" if kind == tarfile.SYMTYPE else "hard link"
    assert "Traceback" not in p.stderr and "KeyError" not in p.stderr, p.stderr
    assert any(word in ln and "regular files only" in ln for ln in lines), p.stderr
    partial = Store(box / "data" / "store").partial_dir
    assert not partial.exists() or not list(partial.iterdir())
