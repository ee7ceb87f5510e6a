"""`lock` for every source kind (Hub and registry fakes on loopback), stale locks, Ollama trees."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from node.config import load_config
from node.errors import StoreError
from node.supply.download import RemoteError
from node.supply.lockfile import read_lock, write_lock
from node.supply.manifest import check_manifest, rebuild_manifest
from node.supply.pull import pull_entry
from node.supply.resolve import build_lock
from node.supply.store import Store
from runtimes import ModelLayout
from tests.conftest import run_cli
from tests.fakes.hf_hub import FakeHub
from tests.fakes.ollama_registry import FakeRegistry

GGUF = os.urandom(200_000)
TOKENIZER = b'{"model": {"type": "BPE"}}'
TEMPLATE = b"{{ .Prompt }}"
PARAMS = b'{"stop": ["</s>"]}'


def write_box(dir: Path, models: str) -> Path:
    (dir / "appliance.toml").write_text(f'[node]\nname = "t"\ndata_dir = "data"\nlisten = "127.0.0.1:1"\n\n{models}')
    return dir / "appliance.toml"


def model(source: str, name: str = "m", runtime: str = "llamacpp", extra: str = "") -> str:
    return f'[[models]]\nname = "{name}"\nsource = "{source}"\nruntime = "{runtime}"\n{extra}\n'


@pytest.fixture
def hub(monkeypatch, tmp_path):
    h = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))  # not this user's login
    yield h
    h.stop()


@pytest.fixture
def registry():
    r = FakeRegistry().start()
    yield r
    r.stop()


def lock_of(path: Path):
    cfg = load_config(str(path))
    lock = build_lock(cfg)
    write_lock(cfg.lock_path, lock)
    return cfg, read_lock(cfg.lock_path)


def test_hf_branch_resolves_to_commit_with_lfs_and_hashed_files(tmp_path, hub):
    sha = hub.commit("org/tiny", {"tiny.gguf": GGUF, "tokenizer.json": TOKENIZER, ".gitattributes": b"x"})
    cfg, lock = lock_of(write_box(tmp_path, model("hf:org/tiny")))
    e = lock.entry("m")
    assert e.revision == sha
    files = {f.path: f for f in e.files}
    assert set(files) == {"tiny.gguf", "tokenizer.json"}  # dotfiles are not model files
    assert files["tiny.gguf"].sha256 == hashlib.sha256(GGUF).hexdigest()  # the LFS oid
    assert files["tokenizer.json"].sha256 == hashlib.sha256(TOKENIZER).hexdigest()  # hashed: no LFS oid
    assert files["tokenizer.json"].size == len(TOKENIZER)


def test_hf_tag_commit_and_glob(tmp_path, hub):
    old = hub.commit("org/tiny", {"a.Q4.gguf": GGUF, "a.Q8.gguf": GGUF[::-1]}, ref="v1")
    hub.commit("org/tiny", {"a.Q4.gguf": GGUF[:1000] + GGUF}, ref="main")
    for i, src in enumerate(["hf:org/tiny@v1#*Q8.gguf", f"hf:org/tiny@{old}#*Q8.gguf"]):
        d = tmp_path / str(i)
        d.mkdir()
        _, lock = lock_of(write_box(d, model(src)))
        e = lock.entry("m")
        assert e.revision == old and [f.path for f in e.files] == ["a.Q8.gguf"]


def test_hf_pull_is_by_commit_even_after_the_branch_moves(tmp_path, hub):
    hub.commit("org/tiny", {"tiny.gguf": GGUF})
    cfg, lock = lock_of(write_box(tmp_path, model("hf:org/tiny")))
    hub.commit("org/tiny", {"tiny.gguf": b"new weights " * 200})  # main moves on
    store = Store(cfg.data_dir / "store")
    pull_entry(store, lock.entry("m"), cfg.model("m"), cfg)
    assert store.model_path(lock.entry("m"), ModelLayout.GGUF_FILE).read_bytes() == GGUF


def test_hf_errors_are_one_clear_line(tmp_path, hub):
    hub.commit("org/tiny", {"tiny.gguf": GGUF})
    with pytest.raises(RemoteError, match="no branch, tag or commit 'nope' in org/tiny"):
        lock_of(write_box(tmp_path, model("hf:org/tiny@nope")))
    with pytest.raises(RemoteError, match="repo not found .*HF_TOKEN"):
        lock_of(write_box(tmp_path, model("hf:org/missing")))
    with pytest.raises(RemoteError, match="no files match '#\\*.safetensors'"):
        lock_of(write_box(tmp_path, model("hf:org/tiny#*.safetensors")))
    p = run_cli("lock", config=write_box(tmp_path, model("hf:org/tiny@nope")), env={"HF_ENDPOINT": hub.url})
    assert p.returncode == 1 and "no branch, tag or commit 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_hf_token_is_sent_to_the_hub(tmp_path, monkeypatch):
    h = FakeHub(token="hf_secret").start()
    try:
        h.commit("org/private", {"tiny.gguf": GGUF})
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        with pytest.raises(RemoteError, match="HF_TOKEN"):
            lock_of(write_box(tmp_path, model("hf:org/private")))
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        cfg, lock = lock_of(write_box(tmp_path, model("hf:org/private")))
        store = Store(cfg.data_dir / "store")
        pull_entry(store, lock.entry("m"), cfg.model("m"), cfg)
        assert store.verify(lock.entry("m")) == []
        assert any(s.authorization == "Bearer hf_secret" and "/resolve/" in s.path for s in h.seen)
    finally:
        h.stop()


def test_hf_token_saved_by_login_is_used(tmp_path):
    """`hf auth login` (or `huggingface-cli login`) saves the token under $HF_HOME: lock and pull use it."""
    h = FakeHub(token="hf_saved").start()
    try:
        h.commit("org/private", {"tiny.gguf": GGUF})
        home = tmp_path / "hf-home"
        home.mkdir()
        (home / "token").write_text("hf_saved\n")
        cfg_path = write_box(tmp_path, model("hf:org/private"))
        env = {"HF_ENDPOINT": h.url, "HF_HOME": str(home), "HF_TOKEN": ""}  # no token in the environment
        run_cli("lock", config=cfg_path, env=env, check=True)
        run_cli("pull", config=cfg_path, env=env, check=True)
        assert any(s.authorization == "Bearer hf_saved" and "/api/models/" in s.path for s in h.seen)
        assert any(s.authorization == "Bearer hf_saved" and "/resolve/" in s.path for s in h.seen)
    finally:
        h.stop()


def test_lock_check_reports_stale_and_exits_1(tmp_path, hub):
    hub.commit("org/tiny", {"a.Q4.gguf": GGUF, "a.Q8.gguf": GGUF[::-1]})
    cfg_path = write_box(tmp_path, model("hf:org/tiny#*Q4.gguf"))
    env = {"HF_ENDPOINT": hub.url}
    assert run_cli("lock", config=cfg_path, env=env).returncode == 0
    ok = run_cli("lock", "--check", config=cfg_path, env=env)
    assert ok.returncode == 0 and "up to date" in ok.stdout
    cfg_path.write_text(cfg_path.read_text().replace("#*Q4.gguf", "#*Q8.gguf"))
    before = (tmp_path / "models.lock").read_text()
    stale = run_cli("lock", "--check", config=cfg_path, env=env)
    assert stale.returncode == 1
    assert "m: source is 'hf:org/tiny#*Q8.gguf' in appliance.toml but 'hf:org/tiny#*Q4.gguf' in models.lock" in stale.stderr
    assert (tmp_path / "models.lock").read_text() == before  # --check writes nothing
    pulled = run_cli("pull", config=cfg_path, env=env)
    assert pulled.returncode == 1 and "run `infernode lock`" in pulled.stderr
    assert run_cli("lock", config=cfg_path, env=env).returncode == 0
    assert run_cli("lock", "--check", config=cfg_path, env=env).returncode == 0


def test_file_and_builtin_sources_are_hashed_at_lock(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.gguf").write_bytes(GGUF)
    _, lock = lock_of(write_box(tmp_path, model("file:w#*.gguf") + model("builtin:tiny-chat#*.gguf", name="b")))
    assert lock.entry("m").files[0].sha256 == hashlib.sha256(GGUF).hexdigest()
    assert lock.entry("b").files[0].path.endswith(".gguf")


def ollama_model(registry) -> str:
    return model("ollama:tiny:q4", runtime="ollama", extra=f'registry = "{registry.url}"')


def test_ollama_lock_pins_manifest_and_layers(tmp_path, registry):
    digest = registry.push("library/tiny", "q4", [("application/vnd.ollama.image.model", GGUF),
                                                  ("application/vnd.ollama.image.template", TEMPLATE),
                                                  ("application/vnd.ollama.image.params", PARAMS)])
    _, lock = lock_of(write_box(tmp_path, ollama_model(registry)))
    e = lock.entry("m")
    assert e.revision == f"sha256:{digest}"
    host = registry.url.removeprefix("http://")
    assert e.files[0].path == f"manifests/{host}/library/tiny/q4" and e.files[0].sha256 == digest
    assert [f.media_type for f in e.files[1:]] == ["application/vnd.docker.container.image.v1+json",
                                                    "application/vnd.ollama.image.model",
                                                    "application/vnd.ollama.image.template",
                                                    "application/vnd.ollama.image.params"]
    assert e.files[2].path == f"blobs/sha256-{hashlib.sha256(GGUF).hexdigest()}"
    # The lock alone rebuilds the manifest byte for byte, so it can be checked offline.
    assert hashlib.sha256(rebuild_manifest(e)).hexdigest() == digest
    check_manifest(e, rebuild_manifest(e))
    with pytest.raises(StoreError, match="names other blobs"):
        check_manifest(e, rebuild_manifest(e).replace(b'"size":13', b'"size":14'))


def test_ollama_pull_lays_out_an_ollama_models_tree(tmp_path, registry):
    registry.push("library/tiny", "q4", [("application/vnd.ollama.image.model", GGUF),
                                         ("application/vnd.ollama.image.template", TEMPLATE)])
    cfg, lock = lock_of(write_box(tmp_path, ollama_model(registry)))
    registry.push("library/tiny", "q4", [("application/vnd.ollama.image.model", GGUF[::-1])])  # tag moves on
    e = lock.entry("m")
    store = Store(cfg.data_dir / "store")
    pull_entry(store, e, cfg.model("m"), cfg)
    # Fetched by digest, never by the (moved) tag.
    paths = [s.path for s in registry.seen]
    assert f"/v2/library/tiny/manifests/{e.revision}" in paths
    root = store.model_path(e, ModelLayout.OLLAMA_TREE)
    assert root == store.root / "ollama"
    # What Ollama reads: manifests/<host>/<namespace>/<model>/<tag>, then blobs/sha256-<hex> per digest.
    host = registry.url.removeprefix("http://")
    manifest = root / "manifests" / host / "library" / "tiny" / "q4"
    doc = json.loads(manifest.read_bytes())
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == e.revision.removeprefix("sha256:")
    for layer in [doc["config"], *doc["layers"]]:
        blob = root / "blobs" / layer["digest"].replace(":", "-")
        assert blob.stat().st_size == layer["size"]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"].removeprefix("sha256:")
        assert os.path.samefile(blob, store.blob_path(layer["digest"].removeprefix("sha256:")))  # a link, not a copy
    assert sorted(p.name for p in (root / "blobs").iterdir()) == sorted(
        layer["digest"].replace(":", "-") for layer in [doc["config"], *doc["layers"]])
    assert run_cli("verify", config=cfg.path).returncode == 0


def test_ollama_unknown_tag_is_a_clear_error(tmp_path, registry):
    with pytest.raises(RemoteError, match=r"m: ollama:tiny:q4: HTTP 404"):
        lock_of(write_box(tmp_path, ollama_model(registry)))


def test_ollama_registry_change_makes_the_lock_stale(tmp_path, registry):
    registry.push("library/tiny", "q4", [("application/vnd.ollama.image.model", GGUF)])
    cfg_path = write_box(tmp_path, ollama_model(registry))
    lock_of(cfg_path)
    assert run_cli("lock", "--check", config=cfg_path).returncode == 0
    cfg_path.write_text(cfg_path.read_text().replace(registry.url, "https://registry.example.com"))
    stale = run_cli("lock", "--check", config=cfg_path)
    assert stale.returncode == 1 and "registry is 'https://registry.example.com'" in stale.stderr


def test_ollama_registry_with_anonymous_token_auth(tmp_path):
    reg = FakeRegistry(token_auth=True).start()
    try:
        reg.push("library/tiny", "q4", [("application/vnd.ollama.image.model", GGUF)])
        cfg, lock = lock_of(write_box(tmp_path, ollama_model(reg)))
        store = Store(cfg.data_dir / "store")
        pull_entry(store, lock.entry("m"), cfg.model("m"), cfg)
        assert store.verify(lock.entry("m")) == []
        tokens = [s for s in reg.seen if s.path.startswith("/token")]
        assert tokens and "scope=repository%3Alibrary%2Ftiny%3Apull" in tokens[0].path
        assert any(s.path.startswith("/v2/library/tiny/manifests/") and s.authorization for s in reg.seen)
    finally:
        reg.stop()


def test_hf_token_is_not_sent_to_the_cdn(tmp_path, monkeypatch):
    hub, cdn = FakeHub(token="hf_secret").start(), FakeHub().start()
    try:
        hub.commit("org/private", {"tiny.gguf": GGUF})
        cdn.blobs = hub.blobs
        hub.cdn_url = cdn.url  # another origin, as the Hub's storage is
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        cfg, lock = lock_of(write_box(tmp_path, model("hf:org/private")))
        store = Store(cfg.data_dir / "store")
        pull_entry(store, lock.entry("m"), cfg.model("m"), cfg)
        assert store.verify(lock.entry("m")) == []
        assert [s.authorization for s in hub.seen if "/resolve/" in s.path] == ["Bearer hf_secret"]
        cdn_seen = [s for s in cdn.seen if s.path.startswith("/cdn/")]
        assert cdn_seen and all(s.authorization is None for s in cdn_seen)
    finally:
        hub.stop()
        cdn.stop()


def test_lock_streams_a_url_when_head_is_refused(tmp_path):
    """A server that refuses HEAD and gzips a body anyway (597 KiB inflating to ~600 MB took 1.2 GB of RSS):
    `lock` hashes the bytes as they come, in bounded memory, and they are what `pull` stores."""
    import http.server
    import subprocess
    import sys
    import threading
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)          # gzip, made a MiB at a time (no peak in this process:
    zero = b"\0" * (1 << 20)                           # a child inherits its parent's RSS high-water mark)
    bomb = b"".join(z.compress(zero) for _ in range(600)) + z.flush()
    digest = hashlib.sha256(bomb).hexdigest()

    class NoHead(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(405)
            self.end_headers()

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-encoding", "gzip")
            self.send_header("content-length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoHead)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/m.gguf"
        box = write_box(tmp_path, model(f"{url}#sha256={digest}"))
        # In a child, so its peak RSS is its own: the high-water mark is reset first (clear_refs 5), since a
        # forked child starts from its parent's (pytest's, hundreds of MiB late in a full run).
        code = ("import re; open('/proc/self/clear_refs', 'w').write('5');"
                "from node.config import load_config; from node.supply.resolve import build_lock;"
                f"lock = build_lock(load_config({str(box)!r})); f = lock.models[0].files[0];"
                "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1);"
                "print(f.size, f.sha256, hwm)")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert p.returncode == 0, p.stderr
        size, sha, peak_kb = p.stdout.split()
        assert int(size) == len(bomb) and sha == digest
        print(f"lock of a {len(bomb) >> 10} KiB gzip body (600 MiB inflated), HEAD refused: peak RSS {int(peak_kb) >> 10} MiB")
        assert int(peak_kb) < 200 << 10
    finally:
        srv.shutdown()
