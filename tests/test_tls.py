"""TLS on the node's port (node/gateway/tls.py): certificates from trustme CAs, reload, mTLS, `infernode tls selfsigned`."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from node.config import parse_config
from node.errors import ConfigError, OperationFailed
from node.gateway.tls import server_context
from tests.conftest import run_cli
from tests.test_httpd import Running, run


def _pair(ca: trustme.CA, dir: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = dir / f"{name}.crt", dir / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def _client_ctx(ca: trustme.CA, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if client is not None:
        client.configure_cert(ctx)
    return ctx


def test_https_and_a_reload_that_new_connections_see(tmp_path: Path):
    ca1, ca2 = trustme.CA(), trustme.CA()
    first, second = _pair(ca1, tmp_path, "one"), _pair(ca2, tmp_path, "two")

    async def main():
        async with Running() as s:
            await s.server.set_tls(server_context(*first))
            url = f"https://127.0.0.1:{s.port}/hello"
            async with httpx.AsyncClient(verify=_client_ctx(ca1)) as old:
                r = await old.get(url)
                assert r.status_code == 200 and r.json()["path"] == "/hello" and r.http_version == "HTTP/1.1"
                await s.server.set_tls(server_context(*second))  # what SIGHUP does
                async with httpx.AsyncClient(verify=_client_ctx(ca2)) as new:
                    assert (await new.get(url)).status_code == 200
                async with httpx.AsyncClient(verify=_client_ctx(ca1)) as stale:
                    with pytest.raises(httpx.ConnectError):
                        await stale.get(url)
                assert (await old.get(url)).status_code == 200  # an open connection keeps its session
            # Plain HTTP on the TLS port is not served.
            data = await s.raw(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", timeout=3)
            assert not data.startswith(b"HTTP/1.1 200")
    run(main())


def test_client_certificates_when_a_client_ca_is_set(tmp_path: Path):
    server_ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key = _pair(server_ca, tmp_path, "server")
    ca_path = tmp_path / "clients.pem"
    client_ca.cert_pem.write_to_path(str(ca_path))

    async def main():
        async with Running() as s:
            await s.server.set_tls(server_context(cert, key, ca_path))
            url = f"https://127.0.0.1:{s.port}/m"
            good = client_ca.issue_cert("alice@example.com")
            async with httpx.AsyncClient(verify=_client_ctx(server_ca, good)) as c:
                assert (await c.get(url)).status_code == 200
            for who in (None, rogue_ca.issue_cert("mallory@example.com")):
                async with httpx.AsyncClient(verify=_client_ctx(server_ca, who)) as c:
                    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                        await c.get(url)
    run(main())


def test_selfsigned_pair_serves_and_refuses_to_overwrite(tmp_path: Path):
    p = run_cli("tls", "selfsigned", "--out", str(tmp_path), "--name", "localhost", "--name", "127.0.0.1")
    assert p.returncode == 0, p.stderr
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    assert key.stat().st_mode & 0o777 == 0o600 and b"BEGIN CERTIFICATE" in cert.read_bytes()

    async def main():
        async with Running() as s:
            await s.server.set_tls(server_context(cert, key))
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as c:  # its own CA
                assert (await c.get(f"https://localhost:{s.port}/x")).status_code == 200
    run(main())
    again = run_cli("tls", "selfsigned", "--out", str(tmp_path))
    assert again.returncode == 1 and "--force" in again.stderr


def test_tls_config_is_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        parse_config({"node": {"tls_cert": "a.pem"}}, tmp_path / "appliance.toml")
    with pytest.raises(ConfigError, match="tls_client_ca"):
        parse_config({"node": {"tls_client_ca": "ca.pem"}}, tmp_path / "appliance.toml")
    cfg = parse_config({"node": {"tls_cert": "c.pem", "tls_key": "k.pem"}}, tmp_path / "appliance.toml")
    assert cfg.node.tls_cert == tmp_path / "c.pem" and cfg.node.scheme == "https"
    with pytest.raises(OperationFailed, match="no such file"):
        server_context(tmp_path / "c.pem", tmp_path / "k.pem")
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(OperationFailed, match="PEM"):
        server_context(tmp_path / "c.pem", tmp_path / "k.pem")
    for key, bad in (("max_connections", 0), ("write_stall_s", -1), ("max_body_bytes", 1 << 40),
                     ("keep_alive_s", "long")):
        with pytest.raises(ConfigError, match=key):
            parse_config({"node": {key: bad}}, tmp_path / "appliance.toml")


def test_up_with_a_missing_certificate_says_so_and_exits_1(tmp_path: Path):
    from tests.conftest import write_config

    cfg = write_config(tmp_path, "")
    cfg.write_text(cfg.read_text().replace("drain_grace_s = 5\n", 'drain_grace_s = 5\ntls_cert = "no.crt"\n'
                                                                  'tls_key = "no.key"\n', 1))
    p = run_cli("up", config=cfg, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "tls_cert" in p.stderr and "no such file" in p.stderr and "Traceback" not in p.stderr


def _silent(port: int, n: int, source: str = "127.0.0.1") -> list:
    """n TCP connections that never send a ClientHello."""
    import socket
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


def _closed_by_peer(s, wait: float) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except OSError:   # timeout: still open
        return False


def test_tls_connections_count_from_accept_and_have_a_handshake_deadline(tmp_path: Path):
    """Silent TLS connections hold a place under the per-address cap at once, and lose it at the deadline."""
    ca = trustme.CA()
    cert, key = _pair(ca, tmp_path, "s")

    async def main():
        import asyncio
        async with Running(max_connections_per_ip=20, handshake_timeout_s=2.0) as s:
            await s.server.set_tls(server_context(cert, key))
            socks = await asyncio.to_thread(_silent, s.port, 30)
            await asyncio.sleep(0.2)
            assert s.server.admission.per_ip.get("127.0.0.1") == 20      # counted before any handshake
            over = await asyncio.to_thread(lambda: sum(_closed_by_peer(x, 0.02) for x in socks))
            assert over == 10                                          # those past the cap are closed at once
            # a client from another address is served meanwhile
            url = f"https://127.0.0.1:{s.port}/x"
            other = httpx.AsyncHTTPTransport(verify=_client_ctx(ca), local_address="127.0.0.2")
            async with httpx.AsyncClient(transport=other) as c:
                assert (await c.get(url)).status_code == 200
            await asyncio.sleep(2.5)                                  # past the handshake deadline
            assert s.server.admission.per_ip.get("127.0.0.1", 0) == 0
            gone = await asyncio.to_thread(lambda: sum(_closed_by_peer(x, 0.5) for x in socks))
            assert gone == 30
            for x in socks:
                x.close()
            async with httpx.AsyncClient(verify=_client_ctx(ca)) as c:  # and the address is served again
                r = await c.post(url, content=b"hello")
                assert r.status_code == 200 and r.json()["body"] == "hello"
    run(main())


def test_node_holds_a_flood_of_silent_tls_connections(tmp_path: Path):
    """A real node with TLS: 3,000 connections from one address that never say hello; figures printed."""
    import os
    import resource
    import time

    from tests.conftest import start_node, write_config
    need = 3200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < need + 200:
        pytest.skip(f"the file limit ({hard}) is below the {need} sockets this test opens")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need + 200), hard))
    ca = trustme.CA()
    cert, key = _pair(ca, tmp_path, "s")
    cfg = write_config(tmp_path, "")
    cfg.write_text(cfg.read_text().replace("drain_grace_s = 5\n", f'drain_grace_s = 5\ntls_cert = "{cert}"\n'
                                           f'tls_key = "{key}"\ntls_handshake_timeout_s = 2\n', 1))
    node = start_node(cfg)
    try:
        port = int(node.url.rsplit(":", 1)[1])
        url = f"https://127.0.0.1:{port}/healthz"
        client = httpx.Client(verify=_client_ctx(ca), timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.get(url).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        pid = node.proc.pid

        def rss_mb() -> float:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20

        def cpu_s() -> float:
            f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        rss0, cpu0 = rss_mb(), cpu_s()
        socks, worst, fresh_worst = [], 0.0, 0.0
        # the bystander comes from another loopback address: not under the flooder's per-address cap
        ctx = _client_ctx(ca)
        by = httpx.Client(timeout=10, transport=httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2"))
        assert by.get(url).status_code == 200                     # its keep-alive connection, made before the flood
        for i in range(30):                                        # 3,000 silent connections, bystander between
            socks += _silent(port, 100)
            t = time.monotonic()
            assert by.get(url).status_code == 200, i
            worst = max(worst, time.monotonic() - t)
            t = time.monotonic()                                   # and a new bystander connection is served too
            with httpx.Client(timeout=10, transport=httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2")) as c:
                assert c.get(url).status_code == 200, i
            fresh_worst = max(fresh_worst, time.monotonic() - t)
        by.close()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        assert fds < 256 + 100, f"the node holds {fds} descriptors: silent connections are not capped"
        rss_growth, cpu = rss_mb() - rss0, cpu_s() - cpu0
        time.sleep(3)                                              # past the 2 s handshake deadline
        still = sum(not _closed_by_peer(s, 0.01) for s in socks[:256])
        for s in socks:
            s.close()
        print(f"3,000 silent TLS connections from one address: node CPU {cpu:.2f} s, RSS +{rss_growth:.1f} MB, "
              f"{fds} descriptors, bystander /healthz worst {worst * 1000:.0f} ms (on a new TLS connection "
              f"{fresh_worst * 1000:.0f} ms); {still} of the 256 admitted "
              "still open after the deadline")
        assert still == 0
        assert rss_growth < 64 and worst < 0.3
        client.close()
    finally:
        node.stop()
