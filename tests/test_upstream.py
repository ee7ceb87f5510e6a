"""The gateway's parts on their own: the upstream HTTP client, backpressure gates, routing, the context check."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass

import httpx
import pytest

from node.accounts.keys import KeyRecord, KeyRing, hash_secret
from node.accounts.quotas import Quotas
from node.errors import InvalidRequest
from node.gateway.context import check
from node.gateway.exchange import ModelInfo
from node.gateway.gateway import Gateway
from node.gateway.listener import Server
from node.gateway.upstream import BUFFER_LIMIT, BrokenResponse, ConnectFailed, Pool, TimedOut, Unanswered
from node.ops.metrics import Metrics
from node.workers.router import Router
from tests.conftest import free_port
from tests.fakes import openai_worker
from tests.inprocess import external_replica

BODY = b'data: {"a":1}\n\n' * 20


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def serve(handler) -> tuple[asyncio.AbstractServer, str, list]:
    """A raw HTTP server: handler(reader, writer) answers each request; returns server, base URL, connections."""
    conns: list = []

    async def on_conn(reader, writer):
        conns.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
                await reader.readexactly(size)
                if await handler(reader, writer) is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1", conns


def test_chunked_split_anywhere_and_keepalive_reuse():
    async def main():
        async def handler(reader, writer):
            data = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(BODY, 7)
            for i in range(0, len(data), 5):  # framing split at every possible place
                writer.write(data[i:i + 5])
                await writer.drain()
                await asyncio.sleep(0)
        server, base, conns = await serve(handler)
        pool = Pool()
        for _ in range(3):
            resp = await pool.request("POST", base, "/chat/completions", b"{}")
            assert resp.status == 200 and await resp.read() == BODY
            resp.close()
        assert len(conns) == 1  # one keep-alive connection served all three
        await pool.aclose()
        server.close()
    asyncio.run(main())


def test_content_length_eof_and_stale_connection_retry():
    async def main():
        n = {"i": 0}

        async def handler(reader, writer):
            n["i"] += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            await writer.drain()
            return False  # the server closes every connection after one answer (no keep-alive)
        server, base, conns = await serve(handler)
        pool = Pool()
        for _ in range(2):
            resp = await pool.request("POST", base, "/x", b"{}")
            assert await resp.read() == b"hello"
            resp.close()
            await asyncio.sleep(0.05)
        assert n["i"] == 2 and len(conns) == 2  # the closed pooled connection was replaced, not an error
        server.close()
    asyncio.run(main())


def test_failures_are_classified():
    async def main():
        pool = Pool(connect_timeout=2, read_timeout=0.5)
        with pytest.raises(ConnectFailed):
            await pool.request("POST", f"http://127.0.0.1:{free_port()}/v1", "/x", b"{}")

        async def breaks(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
            await writer.drain()
            return False
        server, base, _ = await serve(breaks)
        resp = await pool.request("POST", base, "/x", b"{}")
        with pytest.raises(BrokenResponse):
            await resp.read()
        resp.close()
        server.close()

        async def stalls(reader, writer):
            await asyncio.sleep(2)
        server, base, _ = await serve(stalls)
        with pytest.raises(TimedOut):
            await pool.request("POST", base, "/x", b"{}")
        server.close()
    asyncio.run(main())


def test_a_slow_reader_pauses_a_fast_worker():
    """The worker streams faster than the body is read: reading pauses, memory stays bounded, nothing is lost."""
    total = 64 << 20  # more than loopback socket buffers hold, even when tuned large
    piece = bytes(range(256)) * 256  # 64 KiB

    async def main():
        sent = {"n": 0}

        async def handler(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            while sent["n"] < total:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent["n"] += len(piece)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        server, base, _ = await serve(handler)
        pool = Pool()
        resp = await pool.request("POST", base, "/x", b"{}")
        await asyncio.sleep(0.5)  # the consumer reads nothing for a while
        conn = resp._conn
        assert not conn.transport.is_reading()
        assert conn.size <= BUFFER_LIMIT + (512 << 10)  # the limit, plus at most one network read
        assert sent["n"] < total // 2  # the worker was held back by TCP, not drained into memory
        got, digest = 0, hashlib.sha256()
        async for data in resp.chunks():
            got += len(data)
            digest.update(data)
            assert conn.size <= BUFFER_LIMIT + (512 << 10)
        expected = hashlib.sha256()
        for _ in range(total // len(piece)):
            expected.update(piece)
        assert got == total and digest.digest() == expected.digest()
        resp.close()
        await pool.aclose()
        server.close()
    asyncio.run(main())


def test_read_timeout_on_the_head_and_on_the_body():
    async def main():
        pool = Pool(read_timeout=0.3)

        async def silent(reader, writer):
            await asyncio.sleep(5)
        server, base, _ = await serve(silent)
        started = time.monotonic()
        with pytest.raises(TimedOut, match="did not answer"):
            await pool.request("POST", base, "/x", b"{}")
        assert 0.25 < time.monotonic() - started < 1.5
        server.close()

        async def stalls_in_body(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
            await writer.drain()
            await asyncio.sleep(5)
        server, base, _ = await serve(stalls_in_body)
        resp = await pool.request("POST", base, "/x", b"{}")
        started = time.monotonic()
        pieces = []
        with pytest.raises(TimedOut, match="sent nothing"):
            async for data in resp.chunks():
                pieces.append(data)
        assert pieces == [b"half"] and 0.25 < time.monotonic() - started < 1.5
        resp.close()
        server.close()

        async def stalls_in_stream(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(BODY, 10)[:-5])
            await writer.drain()
            await asyncio.sleep(5)
        server, base, _ = await serve(stalls_in_stream)
        resp = await Pool(read_timeout=60).request("POST", base, "/x", b"{}")
        resp.drain_timeout(0.2)  # a shorter wait for the end of a stream
        started = time.monotonic()
        with pytest.raises(TimedOut):
            await resp.read()
        assert time.monotonic() - started < 2
        resp.close()
        server.close()
    asyncio.run(main())


def test_a_pooled_connection_the_worker_closed_is_not_reused():
    """The worker closes its side of an idle keep-alive connection: the pool notices and never writes to it."""
    async def main():
        late: list[bytes] = []
        conns = []

        async def on_conn(reader, writer):
            conns.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write_eof()  # the idle connection is closed (for sending) by the worker
            late.append(await reader.read(1000))  # what the client still sent on it, if anything
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = Pool()
        for _ in range(2):
            resp = await pool.request("POST", base, "/x", b"{}")
            assert await resp.read() == b"ok"
            resp.close()
            await asyncio.sleep(0.1)
        await pool.aclose()
        await asyncio.sleep(0.05)
        assert len(conns) == 2 and late == [b"", b""]
        server.close()
    asyncio.run(main())


def test_a_large_request_body_is_written_as_the_worker_takes_it():
    """A 16 MiB body to a worker reading slowly arrives whole, without piling up in the client's write buffer."""
    body = hashlib.sha256(b"seed").digest() * (1 << 19)  # 16 MiB

    async def main():
        async def on_conn(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            digest, left = hashlib.sha256(), size
            while left:
                data = await reader.read(min(left, 1 << 16))
                digest.update(data)
                left -= len(data)
                await asyncio.sleep(0.001)
            answer = digest.hexdigest().encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = Pool()
        most = {"buffered": 0}

        async def watch():
            while True:
                for conn in pool._busy:
                    most["buffered"] = max(most["buffered"], conn.transport.get_write_buffer_size())
                await asyncio.sleep(0.002)
        watcher = asyncio.create_task(watch())
        resp = await pool.request("POST", base, "/x", body)
        assert await resp.read() == hashlib.sha256(body).hexdigest().encode()
        resp.close()
        watcher.cancel()
        assert 0 < most["buffered"] < 2 << 20
        server.close()
    asyncio.run(main())


def test_an_early_answer_stops_the_request_body():
    """A worker that refuses a large body without reading it: the answer comes back, the connection is not reused."""
    async def main():
        conns = []

        async def on_conn(reader, writer):
            conns.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
            await writer.drain()
            await asyncio.sleep(3)  # neither reads the body nor closes
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = Pool(read_timeout=2)
        resp = await pool.request("POST", base, "/x", b"x" * (64 << 20))
        assert resp.status == 413 and await resp.read() == b"big"
        resp.close()
        assert not pool._idle[pool.origin(base)]
        server.close()
    asyncio.run(main())


def test_framings_interim_answers_and_bad_heads():
    async def main():
        pool = Pool(read_timeout=2)

        async def to_eof(reader, writer):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type:  text/plain \r\n\r\n")
            for part in (b"no ", b"length, ", b"ends at EOF"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)
            return False
        server, base, conns = await serve(to_eof)
        resp = await pool.request("POST", base, "/x", b"{}")
        assert resp.status == 200 and resp.header(b"content-type") == b"text/plain"
        assert await resp.read() == b"no length, ends at EOF"
        resp.close()
        server.close()

        async def answers_twice(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        server, base, conns = await serve(answers_twice)
        for _ in range(2):
            resp = await pool.request("POST", base, "/x", b"{}")
            assert await resp.read() == b"ok"
            resp.close()
        assert len(conns) == 2  # a connection that carried an unasked-for answer is not reused
        server.close()

        async def huge_head(reader, writer):
            filler = b"x-filler: %s\r\n" % (b"a" * 1000)
            writer.write(b"HTTP/1.1 200 OK\r\n" + filler * 70 + b"content-length: 0\r\n\r\n")
            await writer.drain()
        server, base, _ = await serve(huge_head)
        with pytest.raises(BrokenResponse, match="too large"):
            await pool.request("POST", base, "/x", b"{}")
        server.close()

        async def garbage(reader, writer):
            writer.write(b"SMTP ready\r\n\r\n")
            await writer.drain()
        server, base, _ = await serve(garbage)
        with pytest.raises(BrokenResponse, match="malformed"):
            await pool.request("POST", base, "/x", b"{}")
        server.close()
    asyncio.run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the pool's default context trusts the test's certificate

    async def main():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)

        async def on_conn(reader, writer):
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(2)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(BODY, 9))
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
        base = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        pool = Pool()
        for _ in range(2):
            resp = await pool.request("POST", base, "/x", b"{}")
            assert await resp.read() == BODY
            resp.close()
        await pool.aclose()
        server.close()
    asyncio.run(main())


@dataclass(eq=False)
class FakeTarget:
    id: str
    openai_base: str
    inflight: int = 0
    plan: object = None


def test_router_picks_least_outstanding():
    r = Router(["m"])
    a, b = FakeTarget("a", "x", 3), FakeTarget("b", "y", 1)
    r.set_ready("m", [a, b])
    assert r.pick("m") is b and r.pick("m", exclude=b) is a and r.pick("other") is None


def test_context_check_rejects_only_the_certain():
    check({"max_tokens": 100, "messages": [{"role": "user", "content": "x" * 100_000}]}, "chat", 1000)  # runs
    with pytest.raises(InvalidRequest, match="max_tokens is 2000"):
        check({"max_tokens": 2000}, "chat", 1000)
    with pytest.raises(InvalidRequest, match="max_completion_tokens"):
        check({"max_completion_tokens": 2000}, "chat", 1000)
    text = "".join(chr(0x4E00 + i % 2000) for i in range(20_000))  # 60 kB of varied CJK
    with pytest.raises(InvalidRequest, match=r"at least 18\d\d tokens"):
        check({"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}, "chat", 1000)
    check({"prompt": [[1] * 900, "short"], "max_tokens": 100}, "completions", 1000)  # batch: each alone fits
    check({"max_tokens": 1000, "prompt": "hi"}, "completions", None)  # context unknown: the worker decides


def test_gateway_retries_a_dead_replica_once(tmp_path):
    """A replica refusing connections: the request goes to the other one, and nothing reaches the client twice."""
    port = free_port()
    stub = openai_worker.start(port)

    class Ledger:
        rows: list = []

        def record(self, row):
            self.rows.append(row)

    try:
        secret = "sk-test-1234567890"
        keys = KeyRing([KeyRecord(id="k1", name="t", secret_hash=hash_secret(secret), prefix=secret[:8])])
        router = Router(["stub-model"])
        dead = external_replica("stub-model", f"http://127.0.0.1:{free_port()}/v1", 0)
        live = external_replica("stub-model", f"http://127.0.0.1:{port}/v1", 1)
        live.begin()  # busier, so picked second
        router.set_ready("stub-model", [dead, live])
        ledger = Ledger()
        gw = Gateway(keys=keys, quotas=Quotas(), router=router, ledger=ledger, metrics=Metrics(),  # type: ignore[arg-type]
                     models={"stub-model": ModelInfo("stub-model")}, client=Pool())

        async def main():
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            server = Server(gw.handle, max_body_bytes=1 << 20)
            await server.start(sock)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as c:
                r = await c.post("/v1/chat/completions", json={"model": "stub-model", "messages": []},
                                 headers={"authorization": f"Bearer {secret}"})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
                router.set_ready("stub-model", [dead])
                r = await c.post("/v1/chat/completions", json={"model": "stub-model", "messages": []},
                                 headers={"authorization": f"Bearer {secret}"})
                assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
            await server.close()
        asyncio.run(main())
        assert [row.status for row in ledger.rows] == [200, 502]
        assert dead.inflight == 0 and live.inflight == 1
    finally:
        stub.kill()
        stub.wait()


def test_a_post_is_never_resent_once_its_bytes_were_written():
    """The worker reads a request and drops the connection without answering: the request
    fails (Unanswered), on a pooled connection as on a fresh one, and the worker saw it once."""
    async def main():
        seen: list[bytes] = []

        async def on_conn(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
                    body = head.split(b"\r\n")[0]
                    seen.append(body)
                    if b"/ok" not in body:
                        break  # read it, then go away without a word (a crash mid-request)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = Pool()
        resp = await pool.request("POST", base, "/ok", b"{}")
        assert await resp.read() == b"ok"
        resp.close()  # pooled: the next request is written on it
        with pytest.raises(Unanswered):
            await pool.request("POST", base, "/charge-once", b"{}")
        with pytest.raises(Unanswered):  # a fresh connection, same rule
            await pool.request("POST", base, "/charge-once-more", b"{}")
        await asyncio.sleep(0.1)
        assert [s.split(b" ")[1] for s in seen] == [b"/ok", b"/charge-once", b"/charge-once-more"]
        # Refused outright: nothing was written, so it is safe to try elsewhere.
        with pytest.raises(ConnectFailed):
            await pool.request("POST", f"http://127.0.0.1:{free_port()}", "/x", b"{}")
        await pool.aclose()
        server.close()
    asyncio.run(main())


def test_timeouts_are_per_request_and_url_credentials_are_basic_auth():
    async def main():
        heads: list[bytes] = []

        async def on_conn(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            await reader.readexactly(2)
            if b"/slow" in head:
                await asyncio.sleep(5)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(read_timeout=600)
        started = time.monotonic()
        with pytest.raises(TimedOut):
            await pool.request("POST", f"http://127.0.0.1:{port}", "/slow", b"{}", read_timeout=0.4)
        assert 0.3 < time.monotonic() - started < 2
        resp = await pool.request("POST", f"http://al%40ice:pa%3Ass@127.0.0.1:{port}/v1", "/x", b"{}")
        assert await resp.read() == b"ok"
        resp.close()
        head = heads[-1].decode("latin-1").lower()
        assert f"host: 127.0.0.1:{port}\r\n" in head and "al%40ice" not in head and "alice" not in head
        assert f"authorization: basic {base64.b64encode(b'al@ice:pa:ss').decode().lower()}\r\n" in head
        await pool.aclose()
        server.close()
    asyncio.run(main())


def test_gateway_does_not_resend_to_another_replica_after_writing(tmp_path):
    """A replica that took the request and died: 502, and the other replica never sees the request."""
    port = free_port()
    stub = openai_worker.start(port)

    async def taker(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # took the head, then died

    class Ledger:
        rows: list = []

        def record(self, row):
            self.rows.append(row)

    try:
        secret = "sk-test-1234567890"
        keys = KeyRing([KeyRecord(id="k1", name="t", secret_hash=hash_secret(secret), prefix=secret[:8])])
        router = Router(["stub-model"])
        ledger = Ledger()
        gw = Gateway(keys=keys, quotas=Quotas(), router=router, ledger=ledger, metrics=Metrics(),  # type: ignore[arg-type]
                     models={"stub-model": ModelInfo("stub-model")}, client=Pool())

        async def main():
            dying = await asyncio.start_server(taker, "127.0.0.1", 0)
            dead = external_replica("stub-model", f"http://127.0.0.1:{dying.sockets[0].getsockname()[1]}/v1", 0)
            live = external_replica("stub-model", f"http://127.0.0.1:{port}/v1", 1)
            live.begin()
            router.set_ready("stub-model", [dead, live])
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            server = Server(gw.handle, max_body_bytes=1 << 20)
            await server.start(sock)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as c:
                r = await c.post("/v1/chat/completions", json={"model": "stub-model", "messages": []},
                                 headers={"authorization": f"Bearer {secret}", "x-request-id": "once-only"})
                assert r.status_code == 502 and r.json()["error"]["code"] == "worker_failed"
            await server.close()
            dying.close()
        asyncio.run(main())
        seen = [e for e in httpx.get(f"http://127.0.0.1:{port}/stub/events", timeout=5).json()
                if e.get("request_id") == "once-only"]
        assert seen == [] and [row.status for row in ledger.rows] == [502]
    finally:
        stub.kill()
        stub.wait()
