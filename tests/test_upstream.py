"""The gateway's parts on their own: the upstream HTTP client, backpressure gates, routing, the context check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import pytest

from node.context import check
from node.errors import InvalidRequest
from node.gateway import Gateway, ModelInfo
from node.keys import KeyRecord, KeyRing, hash_secret
from node.metrics import Metrics
from node.quotas import Quotas
from node.router import Gate, QueueFull, Router
from node.upstream import BrokenResponse, ConnectFailed, Pool, TimedOut
from tests.conftest import free_port
from tests.fakes import openai_worker

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


def test_gate_queues_in_order_and_refuses_beyond():
    async def main():
        gate = Gate(max_inflight=1, max_queue=2)
        await gate.enter(1)
        order = []

        async def waiter(i):
            await gate.enter(5)
            order.append(i)
        tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        assert gate.queued == 2
        with pytest.raises(QueueFull) as e:
            await gate.enter(1)
        assert e.value.retry_after > 0
        gate.leave(0.1)
        await asyncio.sleep(0.01)
        gate.leave(0.1)
        await asyncio.gather(*tasks)
        assert order == [0, 1] and gate.inflight == 1
        gate.leave(0.1)
        assert gate.inflight == 0
        # A waiter that gives up leaves the line; one that times out gets QueueFull.
        await gate.enter(1)
        t = asyncio.create_task(gate.enter(5))
        await asyncio.sleep(0.01)
        t.cancel()
        await asyncio.sleep(0.01)
        assert gate.queued == 0
        with pytest.raises(QueueFull):
            await gate.enter(0.05)
        gate.leave(0)
        assert gate.inflight == 0
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
        dead = FakeTarget("dead", f"http://127.0.0.1:{free_port()}/v1")
        live = FakeTarget("live", f"http://127.0.0.1:{port}/v1", inflight=1)  # busier, so picked second
        router.set_ready("stub-model", [dead, live])
        ledger = Ledger()
        gw = Gateway(keys=keys, quotas=Quotas(), router=router, ledger=ledger, metrics=Metrics(),  # type: ignore[arg-type]
                     models={"stub-model": ModelInfo("stub-model")}, client=Pool(), max_body_bytes=1 << 20,
                     stream_usage=lambda t: True)

        async def main():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://n") as c:
                r = await c.post("/v1/chat/completions", json={"model": "stub-model", "messages": []},
                                 headers={"authorization": f"Bearer {secret}"})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
                router.set_ready("stub-model", [dead])
                r = await c.post("/v1/chat/completions", json={"model": "stub-model", "messages": []},
                                 headers={"authorization": f"Bearer {secret}"})
                assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
        asyncio.run(main())
        assert [row.status for row in ledger.rows] == [200, 502]
        assert dead.inflight == 0 and live.inflight == 1
    finally:
        stub.kill()
        stub.wait()
