"""Tenants cannot hurt each other at the door: cookies, failed-authentication pacing, the console's
forwarded answers. A real `infernode up` on loopback, attacked from this process, with figures
(node CPU, RSS, a bystander's /healthz latency) from tests/test_frontdoor.py's Watch."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from tests.conftest import start_node, write_config
from tests.test_frontdoor import Watch


@pytest.fixture(scope="module")
def paced(tmp_path_factory):
    """A node without models, pacing failed authentication at the default 20 a minute."""
    d = tmp_path_factory.mktemp("paced")
    cfg = write_config(d, "")
    cfg.write_text(cfg.read_text().replace("auth_failures_per_minute = 0\n", "auth_failures_per_minute = 20\n", 1))
    node = start_node(cfg)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def _from(addr: str, base: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=30, transport=httpx.HTTPTransport(local_address=addr), **kw)


def test_cookie_bombs_cost_the_node_nothing(paced):
    """Seven 8 KiB Cookie headers of backslashes (quadratic in http.cookies) on every request."""
    host, port = paced.url.split("//")[1].rsplit(":", 1)
    bomb = b"".join(b"cookie: a=\"" + b"\\" * 8000 + b"\"\r\n" for _ in range(7))
    req = b"GET /ui/api/session HTTP/1.1\r\nhost: x\r\n" + bomb + b"\r\n"
    with Watch(paced) as w:
        socks = []
        for _ in range(32):                        # each gets its 401 and is closed (a refused head ends it)
            s = socket.create_connection((host, int(port)))
            s.sendall(req * 8)
            socks.append(s)
        for s in socks:
            s.settimeout(20)
            got = b""
            while True:
                more = s.recv(65536)
                if not more:
                    break
                got += more
            assert got.startswith(b"HTTP/1.1 401") and b"not_signed_in" in got, got[:300]
            s.close()
    w.assert_bounded("32 connections of 8 pipelined requests of 7 backslash cookies", p99_s=0.3)
    assert w.cpu < 0.5 * 32 and max(w.worst) < 0.3


def test_failed_authentication_is_paced_per_address(paced):
    """Past 20 failures a minute an address gets 429 + Retry-After, its credentials unread; others are served."""
    good = paced.create_key()
    attacker, other = "127.0.0.2", "127.0.0.3"
    with _from(attacker, paced.url) as c:
        codes = [c.get("/v1/models", headers={"authorization": f"Bearer sk-guess-{i}"}).status_code for i in range(25)]
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
        r = c.get("/v1/models", headers={"authorization": f"Bearer {good}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1       # not even a valid key is read
        assert r.json()["error"]["code"] == "too_many_auth_failures"
        # the same address is paced across the APIs: Anthropic's shape, the admin API, the console sign-in
        r = c.post("/v1/messages", headers={"x-api-key": good}, json={})
        assert r.status_code == 429 and r.json()["type"] == "error" and "retry-after" in r.headers
        r = c.get("/admin/v1/status", headers={"authorization": f"Bearer {paced.admin_key}"})
        assert r.status_code == 429 and "retry-after" in r.headers
    with _from(other, paced.url) as c:                   # a valid client elsewhere is unaffected
        assert c.get("/v1/models", headers={"authorization": f"Bearer {good}"}).status_code == 200
        assert c.get("/admin/v1/status", headers={"authorization": f"Bearer {paced.admin_key}"}).status_code == 200


def test_admin_and_console_guesses_are_paced(paced):
    with _from("127.0.0.4", paced.url) as c:
        codes = [c.get("/admin/v1/keys", headers={"authorization": f"Bearer guess{i}"}).status_code
                 for i in range(22)]
        assert codes[:20] == [401] * 20 and codes[20:] == [429, 429], codes
    with _from("127.0.0.5", paced.url) as c:
        t0, codes = time.monotonic(), []
        for i in range(25):
            form = c.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
            codes.append(c.post("/ui/login", data={"csrf": csrf, "token": f"guess-{i}"}).status_code)
        assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
        form = c.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/ui/login", data={"csrf": csrf, "token": paced.admin_key})
        assert r.status_code == 429 and "retry-after" in r.headers
        print(f"25 console guesses in {time.monotonic() - t0:.2f} s, the last 5 refused unread")
    with _from("127.0.0.6", paced.url) as c:             # the admin signs in from elsewhere
        form = c.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/ui/login", data={"csrf": csrf, "token": paced.admin_key})
        assert r.status_code == 303


def test_forwarded_console_answers_carry_the_security_headers(paced):
    with _from("127.0.0.7", paced.url) as c:
        form = c.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        assert c.post("/ui/login", data={"csrf": csrf, "token": paced.admin_key}).status_code == 303
        for path in ("/ui/api/admin/v1/status", "/ui/api/admin/v1/keys", "/ui/api/admin/v1/nope"):
            r = c.get(path)
            assert r.status_code < 500, (path, r.status_code)
            h = r.headers
            assert "frame-ancestors 'none'" in h["content-security-policy"], path
            assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", path
            assert h.get_list("cache-control") == ["no-store"], path
