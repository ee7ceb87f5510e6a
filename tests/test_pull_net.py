"""Pulls over real networks' shapes: an authenticating proxy, https with a private CA, the Hub login."""

from __future__ import annotations

import json
import os
import threading

import pytest

from node.supply.download import NetSettings, RemoteError, SettingsError
from node.supply.proxies import ProxyConfigError, bypassed, parse_proxy, proxy_for
from tests.conftest import run_cli
from tests.fakes.hf_hub import FakeHub
from tests.fakes.http_proxy import FakeProxy
from tests.test_pull import TOKENIZER, WEIGHTS, model_toml, pull, setup_box

FAST = NetSettings(parallel=3, retries=2, backoff_s=0.01, stall_timeout_s=2.0)
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for v in PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
        monkeypatch.delenv(v.upper(), raising=False)
    for v in ("HF_TOKEN", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never the developer's own login
    # huggingface-hub keeps one client per process, made with the environment of its first
    # use (as a real `infernode lock` does); each test here has its own proxy and CA.
    from huggingface_hub.utils import close_session
    close_session()
    yield
    close_session()


@pytest.fixture
def proxy():
    p = FakeProxy().start()
    yield p
    p.stop()


def make_hub(monkeypatch, tls=None, token: str | None = None) -> FakeHub:
    h = FakeHub(token=token)
    if tls is not None:
        h.use_tls(tls)
    h.start()
    h.commit("org/tiny", {"model.Q4.gguf": WEIGHTS, "model.Q8.gguf": WEIGHTS[::-1], "tokenizer.json": TOKENIZER})
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    return h


@pytest.fixture
def ca(tmp_path):
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    return authority, bundle


def server_context(authority):
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


# -- proxies ------------------------------------------------------------------------------------
def test_lock_and_pull_through_an_authenticating_proxy(tmp_path, monkeypatch, proxy):
    hub = make_hub(monkeypatch)
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*.gguf"))  # lock: httpx, via the proxy
        entry = pull(cfg, lock, store, settings=FAST)  # blobs: the bulk client, via the proxy
        assert store.verify(entry) == []
        targets = [s.target for s in proxy.seen if "127.0.0.1:" in s.target]  # see the tunnel test below
        assert targets and all(s.authorized for s in proxy.seen), proxy.seen
        assert any("/api/models/org/tiny" in t for t in targets)
        assert {t for t in targets if "/cdn/" in t} == {f"{hub.url}/cdn/{f.sha256}" for f in entry.files}
        assert all(t.startswith("http://127.0.0.1:") for t in targets)  # absolute form, as a proxy expects
    finally:
        hub.stop()


def test_wrong_proxy_password_fails_clearly_without_retrying(tmp_path, monkeypatch, proxy):
    hub = make_hub(monkeypatch)
    try:
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
        monkeypatch.setenv("HTTP_PROXY", proxy.url(password="wrong"))
        with pytest.raises(RemoteError, match=r"HTTP 407.*HTTPS_PROXY=http://USER:PASSWORD@HOST:PORT") as err:
            pull(cfg, lock, store, settings=NetSettings(retries=5, backoff_s=0.01))
        assert "wrong" not in str(err.value)  # the password is never echoed
        ours = [s for s in proxy.seen if "127.0.0.1:" in s.target]
        assert len(ours) == 1 and not ours[0].authorized
        assert not any(s.path.startswith("/cdn/") for s in hub.seen)
    finally:
        hub.stop()


@pytest.mark.parametrize(("no_proxy", "bypass"), [
    ("127.0.0.1", True), ("127.0.0.1:{port}", True), ("127.0.0.1:1", False), ("*", True), ("127.0.0.0/8", True),
    ("example.com", False), ("example.com, 127.0.0.1:{port}", True)])
def test_no_proxy_bypasses_the_proxy(tmp_path, monkeypatch, proxy, no_proxy, bypass):
    hub = make_hub(monkeypatch)
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        monkeypatch.setenv("NO_PROXY", no_proxy.format(port=hub.server_address[1]))
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
        entry = pull(cfg, lock, store, settings=FAST)
        assert store.verify(entry) == []
        blob_requests = [s for s in proxy.seen if "/cdn/" in s.target or "/resolve/" in s.target]
        assert len(blob_requests) == (0 if bypass else 2), proxy.seen  # the Hub's resolve, then its CDN
        assert any(s.path.startswith("/cdn/") for s in hub.seen)
    finally:
        hub.stop()


def test_no_proxy_forms():
    assert bypassed("cdn.example.com", 443, "example.com")
    assert bypassed("cdn.example.com", 443, ".example.com")
    assert bypassed("cdn.example.com", 443, "*.example.com")
    assert bypassed("example.com", 443, ".example.com")
    assert not bypassed("badexample.com", 443, "example.com")
    assert bypassed("hub.internal", 8443, "hub.internal:8443")
    assert not bypassed("hub.internal", 443, "hub.internal:8443")
    assert bypassed("10.1.2.3", 80, "10.0.0.0/8")
    assert not bypassed("11.1.2.3", 80, "10.0.0.0/8")
    assert bypassed("::1", 80, "[::1]:80")
    assert bypassed("anything", 1, " foo , * ")
    assert not bypassed("huggingface.co", 443, "")


def test_proxy_url_parsing(monkeypatch):
    p = parse_proxy("http://al%40ice:p%3Ass@proxy.lan:3128", "HTTPS_PROXY")
    assert (p.host, p.port) == ("proxy.lan", 3128)
    assert p.authorization == "Basic " + __import__("base64").b64encode(b"al@ice:p:ss").decode()
    assert "p:ss" not in repr(p) and "al@ice" not in repr(p)
    assert parse_proxy("proxy.lan:8080", "HTTP_PROXY").authorization is None
    with pytest.raises(ProxyConfigError, match="HTTPS_PROXY: only http:// proxies"):
        parse_proxy("socks5://proxy.lan:1080", "HTTPS_PROXY")
    with pytest.raises(ProxyConfigError, match="bad port"):
        parse_proxy("http://proxy.lan:99999", "HTTPS_PROXY")
    monkeypatch.setenv("https_proxy", "http://lower:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:1")
    assert proxy_for("https", "huggingface.co", 443).host == "lower"  # lower case wins, as in curl
    monkeypatch.setenv("HTTP_PROXY", "http://plain:1")
    assert proxy_for("http", "x", 80).host == "plain" and proxy_for("https", "x", 443).host == "lower"


# -- https with a private CA -------------------------------------------------------------------------
def test_https_pull_trusts_the_ca_in_ssl_cert_file(tmp_path, monkeypatch, ca):
    authority, bundle = ca
    hub = make_hub(monkeypatch, tls=server_context(authority))
    try:
        assert hub.url.startswith("https://")
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny"))
        hexd = lock.entry("m").files[0].sha256
        hub.faults.drop_after[hexd] = 700_000  # and the TLS path resumes with Range too
        entry = pull(cfg, lock, store, settings=FAST)
        assert store.verify(entry) == []
        assert [s.range for s in hub.seen if s.path == f"/cdn/{hexd}"] == [None, "bytes=700000-"]
    finally:
        hub.stop()


def test_https_pull_refuses_an_untrusted_ca_at_once(tmp_path, monkeypatch, ca):
    authority, bundle = ca
    hub = make_hub(monkeypatch, tls=server_context(authority))
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
        monkeypatch.delenv("SSL_CERT_FILE")  # certifi's roots do not include the test CA
        with pytest.raises(RemoteError, match="certificate.*point SSL_CERT_FILE at a bundle"):
            pull(cfg, lock, store, settings=NetSettings(retries=5, backoff_s=1.0))
        assert not list(store.blobs())
    finally:
        hub.stop()


def test_https_through_an_authenticating_proxy_tunnel(tmp_path, monkeypatch, ca, proxy):
    authority, bundle = ca
    hub = make_hub(monkeypatch, tls=server_context(authority))
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*.gguf"))
        entry = pull(cfg, lock, store, settings=FAST)
        assert store.verify(entry) == []
        port = hub.server_address[1]
        # (huggingface-hub may also look up its agent registry at its import-time endpoint,
        # the real Hub, when the environment names an AI agent: the fake proxy refuses those.)
        ours = [s for s in proxy.seen if s.target.startswith("127.0.0.1:")]
        assert ours and all(s.method == "CONNECT" and s.target == f"127.0.0.1:{port}" and s.authorized
                            for s in ours), proxy.seen
        # lock (httpx) and each blob (the bulk client) tunnelled: the proxy saw no plain request
        assert len(ours) >= 1 + len(entry.files)
        assert any(s.path.startswith("/cdn/") for s in hub.seen)
        # The same tunnel with a wrong password: refused at the CONNECT, not retried.
        monkeypatch.setenv("HTTPS_PROXY", proxy.url(password="nope"))
        seen = len(proxy.seen)
        other = type(store)(tmp_path / "other-store")
        with pytest.raises(RemoteError, match=r"refused to connect to 127.0.0.1: 407 .*USER:PASSWORD@HOST:PORT"):
            pull(cfg, lock, other, settings=NetSettings(retries=5, backoff_s=1.0))
        refused = [s for s in proxy.seen[seen:] if s.target.startswith("127.0.0.1:")]
        assert len(refused) == 2 and not any(s.authorized for s in refused)  # one CONNECT per file
    finally:
        hub.stop()


# -- the Hub login -----------------------------------------------------------------------------------
def test_saved_hub_login_is_used_for_lock_and_pull(tmp_path, monkeypatch):
    hub = make_hub(monkeypatch, token="hf_saved_login_token")
    try:
        home = tmp_path / "hf-home"
        home.mkdir()
        (home / "token").write_text("hf_saved_login_token\n")  # what `hf auth login` writes
        (tmp_path / "appliance.toml").write_text(f'[node]\nname = "t"\ndata_dir = "data"\n\n{model_toml("hf:org/tiny")}')
        cfg = tmp_path / "appliance.toml"
        env = {"HF_HOME": str(home), "HF_ENDPOINT": hub.url}
        p = run_cli("lock", config=cfg, env=env)
        assert p.returncode == 0, p.stderr
        p = run_cli("pull", "--json", config=cfg, env=env)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout.splitlines()[-1])["fetched"] == 3
        hub_side = [s for s in hub.seen if s.path.startswith("/api/models/") or "/resolve/" in s.path]
        assert hub_side and all(s.authorization == "Bearer hf_saved_login_token" for s in hub_side)
        assert "hf_saved_login_token" not in p.stdout + p.stderr
        # HF_TOKEN wins over the saved login, as huggingface-hub has it.
        p = run_cli("lock", config=cfg, env={**env, "HF_TOKEN": "hf_other"})
        assert p.returncode != 0 and hub.seen[-1].authorization == "Bearer hf_other"
        # No login at all: the gated repo is refused, naming both ways to log in.
        (home / "token").unlink()
        p = run_cli("lock", config=cfg, env=env)
        assert p.returncode != 0 and "HF_TOKEN" in p.stderr and "hf auth login" in p.stderr
    finally:
        hub.stop()


# -- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1", "four", "2.5", "65", "nan"])
def test_pull_concurrency_is_validated_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("INFERNODE_PULL_CONCURRENCY", value)
    with pytest.raises(SettingsError, match=rf"INFERNODE_PULL_CONCURRENCY='{value}': must be a whole number from 1 to 64"):
        NetSettings.from_env()


def test_pull_concurrency_bounds_files_in_flight(tmp_path, monkeypatch):
    hub = make_hub(monkeypatch)
    try:
        files = {f"shard-{i}.bin": os.urandom(300_000) + bytes([i]) for i in range(6)}
        hub.commit("org/many", files)
        hub.faults.rate_bps = 2 * 1024 * 1024
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/many"))
        in_flight, peak, guard = 0, 0, threading.Lock()

        class Count:
            def start(self, name, total, done):
                nonlocal in_flight, peak
                with guard:
                    in_flight += 1
                    peak = max(peak, in_flight)

            def advance(self, name, n):
                pass

            def finish(self, name, ok, message=""):
                nonlocal in_flight
                with guard:
                    in_flight -= 1

        p = run_cli("pull", config=cfg.path, env={"HF_ENDPOINT": hub.url, "INFERNODE_PULL_CONCURRENCY": "x"})
        assert p.returncode == 1 and "INFERNODE_PULL_CONCURRENCY='x'" in p.stderr and "Traceback" not in p.stderr
        monkeypatch.setenv("INFERNODE_PULL_CONCURRENCY", "2")
        entry = pull(cfg, lock, store, settings=NetSettings.from_env(), progress=Count())
        assert store.verify(entry) == [] and peak == 2
    finally:
        hub.stop()


def test_bad_proxy_variable_is_a_clear_error(tmp_path, monkeypatch):
    hub = make_hub(monkeypatch)
    try:
        cfg, lock, store = setup_box(tmp_path, model_toml("hf:org/tiny#*Q4.gguf"))
        monkeypatch.setenv("HTTP_PROXY", "https://127.0.0.1:1")
        with pytest.raises(RemoteError, match="HTTP_PROXY: only http:// proxies are supported"):
            pull(cfg, lock, store, settings=FAST)
    finally:
        hub.stop()


# -- progress from many download threads -----------------------------------------------------------
def test_progress_reporters_are_safe_from_many_threads():
    import io

    from rich.console import Console

    from node.supply.progress import JsonProgress, RichProgress

    names = [f"m/shard-{i}" for i in range(8)]
    out = io.StringIO()
    json_p = JsonProgress(out, interval_s=0)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with RichProgress(console, total_bytes=8 * 1000 * 4096) as rich_p:
        def one(name: str) -> None:
            for p in (json_p, rich_p):
                p.start(name, 1000 * 4096, 0)
            for _ in range(1000):
                json_p.advance(name, 4096)
                rich_p.advance(name, 4096)
            for p in (json_p, rich_p):
                p.finish(name, name != "m/shard-3", "boom" if name == "m/shard-3" else "")

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tasks = {t.description: t for t in rich_p._bars.tasks}
    assert tasks["total"].completed == 8 * 1000 * 4096
    assert not tasks["m/shard-0"].visible and tasks["m/shard-3 FAILED"].visible
    events = [json.loads(line) for line in out.getvalue().splitlines()]  # no line torn by another thread
    assert len(events) == 8 * (1000 + 2)
    for name in names:
        mine = [e for e in events if e["file"] == name]
        assert mine[0]["event"] == "start" and [e["done"] for e in mine[1:-1]] == [4096 * i for i in range(1, 1001)]
        assert mine[-1] == ({"event": "error", "file": name, "total": 4096000, "done": 4096000, "error": "boom"}
                            if name == "m/shard-3" else {"event": "done", "file": name, "total": 4096000, "done": 4096000})
