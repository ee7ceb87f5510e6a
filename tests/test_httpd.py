"""The node's HTTP/1.1 server (node/gateway/httpd.py) and its ASGI bridge, over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from node.gateway import httpd
from node.gateway.asgi import serve_asgi
from node.gateway.httpd import Connection, Request, Server


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def echo(req: Request, conn: Connection) -> None:
    """Answers with what it got; /stream streams; /slow waits; /boom raises."""
    if req.path == b"/boom":
        raise RuntimeError("handler bug")
    if req.path == b"/slow":
        await asyncio.sleep(float(req.query.split(b"=")[1]))
    if req.path == b"/stream":
        conn.start(200, [(b"content-type", b"text/event-stream")])
        for i in range(3):
            await conn.write(b"data: %d\n\n" % i)
        conn.end(b"data: [DONE]\n\n")
        return
    body = json.dumps({"method": req.method, "path": req.path.decode(), "query": req.query.decode(),
                       "body": req.body.decode(), "ua": (req.header(b"user-agent") or b"").decode()}).encode()
    conn.respond(200, [(b"content-type", b"application/json")], body)


class Running:
    """A Server on a loopback port inside the test's event loop."""

    def __init__(self, handler=echo, **kw) -> None:
        self.sock = listening()
        self.port = self.sock.getsockname()[1]
        self.server = Server(handler, max_body_bytes=kw.pop("max_body_bytes", 1 << 20), **kw)

    async def __aenter__(self) -> Running:
        await self.server.start(self.sock)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close(grace_s=1)

    async def raw(self, data: bytes, *, read_until_close: bool = True, timeout: float = 5) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(data)
        try:
            if read_until_close:
                return await asyncio.wait_for(reader.read(-1), timeout)
            return await asyncio.wait_for(reader.read(65536), timeout)
        finally:
            writer.close()


def run(coro):
    return asyncio.run(coro)


def test_keep_alive_and_pipelining_answer_in_order():
    async def main():
        async with Running() as s:
            reqs = b"".join(b"GET /a%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(12))
            data = await s.raw(reqs + b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            paths = [json.loads(part.split(b"\r\n\r\n", 1)[1][:int(part.split(b"content-length: ")[1].split(b"\r\n")[0])])["path"]
                     for part in data.split(b"HTTP/1.1 200 OK\r\n")[1:]]
            assert paths == [f"/a{i}" for i in range(12)] + ["/last"]
            assert data.count(b"connection: close") == 1 and b"date: " in data
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.port}") as c:
                for _ in range(3):  # one connection reused
                    r = await c.post("/echo?x=1", content=b"hello", headers={"user-agent": "t"})
                    assert r.json() == {"method": "POST", "path": "/echo", "query": "x=1", "body": "hello", "ua": "t"}
                assert len(s.server.connections) == 1
    run(main())


def test_bodies_chunked_too_large_and_expect_continue():
    async def main():
        async with Running(max_body_bytes=1000) as s:
            chunked = (b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                       b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            data = await s.raw(chunked)
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["body"] == "abcde"
            # Declared too large: refused at once, before the body is sent, with no 100 Continue.
            data = await s.raw(b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\nexpect: 100-continue\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in data
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
            # Too large as it arrives (chunked, no length up front).
            data = await s.raw(b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                               + b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n")
            assert data.startswith(b"HTTP/1.1 413 ")
            # Expect: 100-continue within the limit: the client is told to go on, then answered.
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"body")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.close()
    run(main())


def test_malformed_and_oversized_heads_get_errors_and_a_closed_connection():
    async def main():
        async with Running() as s:
            data = await s.raw(b"NOT HTTP AT ALL\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 400 ") and b"connection: close" in data
            err = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
            assert err["type"] == "invalid_request_error" and "malformed" in err["message"]
            big = b"GET / HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)) + b"\r\n"
            data = await s.raw(big)
            assert data.startswith(b"HTTP/1.1 431 ")
    run(main())


def test_http10_head_and_handler_errors():
    async def main():
        async with Running() as s:
            data = await s.raw(b"GET /old HTTP/1.0\r\n\r\n")  # closed after the answer: read(-1) returns
            assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in data
            data = await s.raw(b"HEAD /h HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            head, _, body = data.partition(b"\r\n\r\n")
            assert b"content-length: " in head and body == b""
            data = await s.raw(b"GET /boom HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 500 ")
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["message"].startswith("internal error")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.port}") as c:
                r = await c.get("/stream")
                assert r.headers["transfer-encoding"] == "chunked"
                assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    run(main())


def test_slow_requests_get_408_and_idle_connections_close(monkeypatch):
    monkeypatch.setattr(httpd, "TICK_S", 0.1)

    async def main():
        async with Running(request_timeout_s=0.5, keep_alive_s=0.5) as s:
            t0 = asyncio.get_running_loop().time()
            data = await s.raw(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")  # body never ends
            assert data.startswith(b"HTTP/1.1 408 ") and asyncio.get_running_loop().time() - t0 < 3
            data = await s.raw(b"GET /x HTTP/1.1\r\nho")  # head never ends
            assert data.startswith(b"HTTP/1.1 408 ")
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
            await reader.readuntil(b"}")
            assert await asyncio.wait_for(reader.read(-1), 3) == b""  # the idle keep-alive connection was closed
            writer.close()
    run(main())


def test_a_client_going_away_cancels_its_handler():
    seen: dict[str, object] = {}

    async def handler(req: Request, conn: Connection) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["gone"] = conn.gone
            raise

    async def main():
        async with Running(handler) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.sleep(0.2)
            writer.close()
            for _ in range(50):
                if "gone" in seen:
                    break
                await asyncio.sleep(0.02)
            assert seen == {"gone": True}
    run(main())


def test_a_slow_reader_pauses_the_writer():
    progress = {"written": 0, "done": False}

    async def handler(req: Request, conn: Connection) -> None:
        conn.start(200, [(b"content-type", b"application/octet-stream")])
        piece = b"x" * 65536
        for _ in range(1024):  # 64 MiB, far more than socket buffers hold
            await conn.write(piece)
            progress["written"] += len(piece)
        conn.end()
        progress["done"] = True

    async def main():
        async with Running(handler) as s:
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.sleep(0.5)
            stalled = progress["written"]
            assert not progress["done"] and stalled < 16 << 20  # waiting on the client, not buffering it all
            conn = next(iter(s.server.connections))
            assert conn.transport.get_write_buffer_size() < 4 << 20
            sock.setblocking(False)
            total = 0
            while not progress["done"] or total < 64 << 20:
                try:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            assert progress["done"] and total > 64 << 20
            sock.close()
    run(main())


def test_close_lets_answers_in_progress_finish_and_drops_idle_connections():
    async def main():
        s = Running()
        await s.server.start(s.sock)
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", s.port)
        idle_w.write(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        await idle_r.readuntil(b"}")
        busy = asyncio.create_task(s.raw(b"GET /slow?s=0.5 HTTP/1.1\r\nhost: x\r\n\r\n"))
        await asyncio.sleep(0.1)
        await s.server.close(grace_s=3)
        data = await busy
        assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in data
        assert await asyncio.wait_for(idle_r.read(-1), 2) == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", s.port)
    run(main())


def test_asgi_bridge_serves_fastapi():
    app = FastAPI()

    @app.post("/admin/items")
    async def create(item: dict):
        return {"got": item}

    @app.get("/admin/stream")
    async def stream():
        async def gen():
            for i in range(3):
                yield f"line {i}\n"
        return StreamingResponse(gen(), media_type="text/plain")

    @app.get("/admin/fail")
    async def fail():
        raise RuntimeError("bug")

    async def handler(req: Request, conn: Connection) -> None:
        await serve_asgi(app, req, conn, extra_headers=[(b"x-request-id", b"rid-1")])

    async def main():
        async with Running(handler) as s:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.port}") as c:
                r = await c.post("/admin/items", json={"a": 1})
                assert r.status_code == 200 and r.json() == {"got": {"a": 1}} and r.headers["x-request-id"] == "rid-1"
                r = await c.post("/admin/items", content=b"not json", headers={"content-type": "application/json"})
                assert r.status_code == 422
                r = await c.get("/admin/stream")
                assert r.text == "line 0\nline 1\nline 2\n" and r.headers["content-type"].startswith("text/plain")
                r = await c.get("/admin/nowhere")
                assert r.status_code == 404
                r = await c.get("/admin/fail")
                assert r.status_code == 500 and r.headers["x-request-id"] == "rid-1"
    run(main())
