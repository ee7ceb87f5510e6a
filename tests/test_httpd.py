"""The node's HTTP/1.1 server (node/gateway/httpd.py) and its ASGI bridge, over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node.gateway import httpd, listener
from node.gateway.asgi import serve_asgi
from node.gateway.httpd import Connection, Request
from node.gateway.listener import Server


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
            data = await s.raw(b"GET /old HTTP/1.0\r\n\r\n")  # answered in its own version, then closed
            assert data.startswith(b"HTTP/1.0 200 ") and b"connection: close" in data
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
    monkeypatch.setattr(listener, "TICK_S", 0.1)

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


# -- the front door: bounded whatever a client sends or fails to read ---------------------

def test_a_header_that_never_ends_is_refused_as_its_bytes_arrive():
    async def main():
        async with Running() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-long: ")
            sent = 0
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                for _ in range(64):  # up to 4 MiB in 64 KiB writes, no CRLF
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536
                    if reader.at_eof() or len(reader._buffer):  # the answer came
                        break
                    await asyncio.sleep(0.01)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
                assert head.startswith(b"HTTP/1.1 431 ")
                raise ConnectionError("answered")
            assert sent <= 4 * 65536  # refused after the cap, not after everything was buffered
            writer.close()
    run(main())


def test_big_bodies_do_not_count_as_the_next_head():
    async def main():
        async with Running() as s:
            big = b"b" * 300_000
            chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (big[:100_000], big[100_000:])) + b"0\r\n\r\n"
            data = await s.raw(b"POST /1 HTTP/1.1\r\nhost: x\r\ncontent-length: 300000\r\n\r\n" + big +
                               b"POST /2 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + chunked +
                               b"GET /3 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert data.count(b"HTTP/1.1 200 OK") == 3 and data.count(b'"body": "bbbb') == 2
    run(main())


def test_trailers_never_become_headers():
    async def main():
        async with Running() as s:
            data = await s.raw(b"POST /t HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                               b"2\r\nhi\r\n0\r\nuser-agent: trailer\r\nauthorization: Bearer sk-x\r\n\r\n")
            got = json.loads(data.split(b"\r\n\r\n", 1)[1])
            assert got["body"] == "hi" and got["ua"] == ""
            # Endless trailers are bounded like a head.
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"POST /t HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-t: ")
            for _ in range(8):
                writer.write(b"t" * 65536)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 431 ")
            writer.close()
    run(main())


def test_answers_use_the_requests_http_version():
    async def main():
        async with Running() as s:
            data = await s.raw(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n"
                               b"connection: close\r\n\r\n")
            first, second = data.split(b"HTTP/1.1 200 OK\r\n")
            assert first.startswith(b"HTTP/1.0 200 OK\r\n") and b"connection: keep-alive" in first
            assert b"connection: close" in second
            data = await s.raw(b"GET /stream HTTP/1.0\r\n\r\n")  # a 1.0 client gets the stream until close
            assert data.startswith(b"HTTP/1.0 200 ") and b"transfer-encoding" not in data
            assert data.endswith(b"data: [DONE]\n\n")
    run(main())


def test_upgrade_with_a_body_is_refused_and_without_one_answered_then_closed():
    async def main():
        async with Running() as s:
            for conn_hdr in (b"connection: upgrade\r\n", b""):
                data = await s.raw(b"POST /u HTTP/1.1\r\nhost: x\r\n" + conn_hdr +
                                   b"upgrade: h2c\r\ncontent-length: 5\r\n\r\nhello", timeout=3)
                assert data.startswith(b"HTTP/1.1 400 ") and b"Upgrade" in data
            data = await s.raw(b"GET /u HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n", timeout=3)
            assert data.startswith(b"HTTP/1.1 200 ") and b"connection: close" in data
    run(main())


def test_connections_over_the_caps_get_a_503():
    async def main():
        async with Running(max_connections=3, max_connections_per_ip=2) as s:
            held = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(2)]
            await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            data = await asyncio.wait_for(reader.read(-1), 3)
            assert data.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in data
            writer.close()
            assert s.server.admission.total == 2 and s.server.admission.refused == 1
            held[0][1].close()
            await asyncio.sleep(0.1)
            data = await s.raw(b"GET /again HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200 ")
            for _, w in held[1:]:
                w.close()
            await asyncio.sleep(0.1)
            assert s.server.admission.total == 0 and not s.server.admission.per_ip
    run(main())


def test_pipelining_without_reading_holds_little():
    async def main():
        async with Running() as s:
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            req = b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n"
            batch = req * 2000
            sent = 0
            for _ in range(200):  # 400k requests offered; the node soon stops reading them
                try:
                    sent += sock.send(batch)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            conn = next(iter(s.server.connections))
            assert len(conn._queue) <= httpd.MAX_PIPELINED
            assert conn.transport.get_write_buffer_size() < 1 << 20
            assert len(conn.reader.unfed) <= 1 << 20
            parsed = conn.reader.heads
            await asyncio.sleep(0.3)
            assert conn.reader.heads == parsed < sent // len(req) // 2  # it stopped reading what it cannot answer
            sock.close()
    run(main())


def test_a_head_check_refuses_before_the_body_is_read():
    seen: list[bytes] = []

    def check(req: Request):
        if req.header(b"authorization") != b"Bearer good":
            return httpd.Refusal(401, [(b"content-type", b"application/json")], b'{"error":"no"}')
        req.auth = "good"
        return None

    async def handler(req: Request, conn: Connection) -> None:
        seen.append(req.body)
        conn.respond(200, [], req.auth.encode())

    async def main():
        async with Running(handler, head_check=check, max_body_bytes=8 << 20) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"POST /v HTTP/1.1\r\nhost: x\r\ncontent-length: 4194304\r\nexpect: 100-continue\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), 3)  # 401, then closed: no 100 Continue
            assert data.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in data
            assert b"connection: close" in data
            writer.close()
            # A client that sends its body anyway still reads the 401 (the node drops the rest).
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"POST /v HTTP/1.1\r\nhost: x\r\ncontent-length: 262144\r\n\r\n" + b"z" * 262144)
            data = await asyncio.wait_for(reader.read(-1), 5)
            assert data.startswith(b"HTTP/1.1 401 ")
            writer.close()
            assert seen == []
            data = await s.raw(b"POST /v HTTP/1.1\r\nhost: x\r\nauthorization: Bearer good\r\ncontent-length: 2\r\n"
                               b"connection: close\r\n\r\nok")
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"good") and seen == [b"ok"]
    run(main())


def test_a_client_that_reads_nothing_is_dropped_and_its_handler_cancelled(monkeypatch):
    monkeypatch.setattr(listener, "TICK_S", 0.1)
    seen: dict[str, object] = {}

    async def handler(req: Request, conn: Connection) -> None:
        conn.start(200, [(b"content-type", b"text/event-stream")])
        try:
            while True:
                await conn.write(b"data: " + b"t" * 200 + b"\n\n")
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            seen["gone"] = conn.gone
            raise

    async def main():
        async with Running(handler, write_stall_s=1.0) as s:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", s.port))
            sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            for _ in range(100):
                if "gone" in seen:
                    break
                await asyncio.sleep(0.1)
            assert seen == {"gone": True} and not s.server.connections
            sock.close()
    run(main())


# -- framing fuzz (hypothesis, a fixed budget of examples) ---------------------------------

PIPELINE = (b"GET /a?x=1 HTTP/1.1\r\nhost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
            b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n"
            b"HEAD /d HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /e HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
            b"GET /f HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=list(HealthCheck))


def _strip_dates(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"date: "))


async def _send_in_pieces(port: int, data: bytes, cuts: list[int]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        writer.write(data[last:cut])
        await writer.drain()
        await asyncio.sleep(0)
        last = cut
    try:
        return await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()


def test_any_split_of_a_pipeline_gets_the_same_answers():
    async def whole() -> bytes:
        async with Running() as s:
            return await _send_in_pieces(s.port, PIPELINE, [])

    expected = _strip_dates(run(whole()))
    assert expected.count(b" 200 OK\r\n") == 6

    @FUZZ
    @given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12))
    def check(cuts: list[int]) -> None:
        async def main() -> bytes:
            async with Running() as s:
                return await _send_in_pieces(s.port, PIPELINE, cuts)
        assert _strip_dates(run(main())) == expected

    check()


def test_random_bytes_never_crash_and_never_get_a_5xx():
    @FUZZ
    @example(b"GET / HTTP/1.1\r\n\r\n")  # valid, and kept alive: answered, then closed when idle
    @given(st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda head, tail: head + tail,
                  st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\ncontent-length: 3\r\n",
                                   b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", b"GET / HTTP/1.0\r\n"]),
                  st.binary(max_size=512))))
    def check(data: bytes) -> None:
        async def main() -> None:
            async with Running(request_timeout_s=1, keep_alive_s=1) as s:  # a valid request may keep it open
                got = await _send_in_pieces(s.port, data, [len(data) // 2])
                for status in (int(line.split(b" ")[1]) for line in got.split(b"\r\n")
                               if line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) and line[9:12].isdigit()):
                    assert status < 500, got
                # The server still serves others.
                ok = await s.raw(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                assert ok.startswith(b"HTTP/1.1 200 ")
        run(main())

    check()
