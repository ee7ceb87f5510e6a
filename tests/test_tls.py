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
