"""The gateway in the test's own process: the real stages and HTTP server, no `infernode up` subprocess.

`GatewayApp` runs a `Gateway` (node/gateway/gateway.py) behind the node's own HTTP server
(node/gateway/listener.py) on loopback, in a thread with its own event loop, in front of
the stub OpenAI worker (tests/fakes/openai_worker.py) served by that same loop. The
worker reaches the gateway as a real `Replica` of an `external` model with its real
launch plan (the worker side of WorkerView); keys, quotas, metrics and the ledger (on a
real SQLite file) are the node's own classes. It starts in milliseconds, so tests that
need only the request path use it instead of a node process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from node.accounts.keys import KeyRecord, KeyRing, hash_secret, new_key_id, new_secret
from node.accounts.ledger import Ledger
from node.accounts.quotas import Quotas
from node.accounts.storage import open_storage
from node.config import NodeSection, SupervisorSection
from node.gateway.exchange import ModelInfo
from node.gateway.gateway import Gateway
from node.gateway.listener import Server
from node.gateway.upstream import Pool
from node.ops.logs import TextFormatter
from node.ops.metrics import Metrics
from node.workers.replica import Replica
from node.workers.router import Router
from runtimes import WorkerSpec, external
from tests.fakes import openai_worker


def external_replica(model: str, url: str, index: int = 0) -> Replica:
    """A ready replica of an `external` model at url, as the supervisor hands it to the router (not started)."""
    spec = WorkerSpec(model=model, replica=index, runtime="external", port=0, url=url)
    r = Replica(spec, SupervisorSection(), Path("/nonexistent/run"), Path("/nonexistent/log"), None)  # type: ignore[arg-type]
    r.plan = external.plan(spec)
    return r


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class GatewayApp:
    """A gateway and a stub worker on loopback; `url` is the gateway's, `stub_url` the worker's."""

    def __init__(self, tmp: Path, models: list[ModelInfo], *, chunks: int = 32, max_model_len: int = 4096) -> None:
        self.tmp = tmp
        self.log = tmp / "gateway.log"
        self.stub = openai_worker.Stub(models[0].name, chunks, max_model_len)
        self.keys, self.quotas, self.metrics = KeyRing(), Quotas(), Metrics()
        self.quotas.set_prices({m.name: (m.price_input, m.price_output) for m in models})
        self.storage = open_storage(f"sqlite:///{tmp / 'infernode.db'}")
        self.storage.migrate()
        self.ledger = Ledger(self.storage, spill_path=tmp / "ledger.spill")
        self.router = Router(m.name for m in models)
        self.gateway = Gateway(keys=self.keys, quotas=self.quotas, router=self.router, ledger=self.ledger,
                               metrics=self.metrics, models={m.name: m for m in models}, client=Pool())
        self._models = models
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-app", daemon=True)
        self._handler = logging.FileHandler(self.log)
        self._handler.setFormatter(TextFormatter())
        self._logger = logging.getLogger("infernode")
        self._level = self._logger.level

    def start(self) -> GatewayApp:
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        self.ledger.start()
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the in-process gateway did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        stub_sock, sock = _listen(), _listen()
        self.stub_server = await self._loop.create_server(lambda: openai_worker.Conn(self.stub), sock=stub_sock)
        self.stub_url = f"http://127.0.0.1:{stub_sock.getsockname()[1]}"
        for m in self._models:
            self.router.set_ready(m.name, [external_replica(m.name, self.stub_url + "/v1")])
        self.server = Server(self.gateway.handle, max_body_bytes=NodeSection().max_body_bytes)
        await self.server.start(sock)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the gateway's loop (to change what it serves) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def submit(self, coro: Any) -> concurrent.futures.Future:
        """Start a coroutine on the gateway's loop; its result comes through the future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def create_key(self, **fields: Any) -> str:
        """A new API key's secret, with those fields (rpm, models, ...)."""
        secret = new_secret()
        self.keys.put(KeyRecord(id=new_key_id(), name="test", secret_hash=hash_secret(secret), prefix=secret[:8],
                                **fields))
        return secret

    def metrics_text(self) -> str:
        """What /metrics would show."""
        return self.metrics.render().decode()

    def idle(self) -> None:
        """Wait until no request is in flight: every answered request has been settled (seen from its loop)."""
        async def settled() -> None:
            while self.gateway.inflight:
                await asyncio.sleep(0.005)
        self.run(settled())

    def ledger_rows(self, **where: Any) -> list[dict]:
        """The ledger's rows (requests settled and the ledger flushed first), as dicts."""
        self.idle()
        self.ledger.flush()
        with sqlite3.connect(self.tmp / "infernode.db") as db:
            db.row_factory = sqlite3.Row
            sql = "SELECT * FROM usage" + (" WHERE " + " AND ".join(f"{k} = ?" for k in where) if where else "")
            return [dict(r) for r in db.execute(sql, tuple(where.values()))]

    def events(self) -> list[dict]:
        """What the stub worker saw, as its /stub/events serves it."""
        return httpx.get(self.stub_url + "/stub/events", timeout=5).json()

    def stop(self) -> None:
        async def close() -> None:
            await self.server.close(0.5)
            self.stub_server.close()
        try:
            self.run(close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self.ledger.close()
            self._logger.removeHandler(self._handler)
            self._logger.setLevel(self._level)
            self._handler.close()


def gateway_app(tmp: Path, models: list[ModelInfo], **kw: Any) -> Iterator[GatewayApp]:
    """A started GatewayApp, stopped afterwards (the body of a fixture)."""
    app = GatewayApp(tmp, models, **kw).start()
    try:
        yield app
    finally:
        app.stop()
