"""Requests the node sends itself through its own gateway: a batch's lines.

A line goes through the same stages as a client's request (admission, the model's queue at
batch priority, the call, settling: quotas, ledger, metrics), answered into memory instead
of a socket. Its lane (`Request.lane`) marks it: budgets apply, rpm and tpm do not (the
scheduler paces batch work), and its ledger row says `api = batch`.

A line can be preempted (`Request.preempt`): when an interactive request comes for its model,
the scheduler stops it as if its client had gone (the worker stops computing it; its ledger
row says 499), and the runner sends it again at once, to wait for its turn.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from node.batches.lines import Line
from node.batches.records import BatchRecord
from node.batches.runner import Execute, Outcome
from node.gateway.request import Request

LANE = "batch"


class Capture:
    """What the gateway answers through (the parts of httpd.Connection it uses), kept in memory."""

    client = None

    def __init__(self) -> None:
        self.gone = False
        self.preempted = False
        self.started = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.status, self.headers, self.started = status, headers, True
        self.parts.append(body)

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers, self.started = status, headers, True

    async def write(self, data: bytes) -> None:
        self.parts.append(data)

    def end(self, data: bytes = b"") -> None:
        self.parts.append(data)

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


async def call(gateway: Any, key: Any, path: bytes, body: bytes, request_id: str, lane: str = LANE) -> Capture:
    """Send one request through the gateway as `key`, in `lane`; the answer, whole."""
    req = Request("POST", path, b"", [(b"content-type", b"application/json"),
                                      (b"x-request-id", request_id.encode("latin-1")),
                                      (b"x-infernode-priority", lane.encode())], "1.1", True)
    req.body, req.auth, req.lane = body, key, lane
    out = Capture()
    task = asyncio.current_task()
    assert task is not None

    def preempt() -> None:
        out.gone = out.preempted = True  # the gateway takes the cancellation as its client going away
        task.cancel()

    req.preempt = preempt
    await gateway.handle(req, out)
    if out.preempted and task.cancelling():  # stopped for its own sake too (the runner is closing)
        raise asyncio.CancelledError
    return out


def batch_executor(gateway: Any, keys: Any) -> Execute:
    """The runner's `execute`: one line through `gateway` as the batch's key."""

    async def execute(batch: BatchRecord, line: Line, request_id: str) -> Outcome:
        key = keys.get(batch.key_id) if batch.key_id else None
        if key is None:
            return Outcome(401, json.dumps({"error": {"message": "the batch's API key no longer exists",
                                                      "type": "authentication_error", "code": "invalid_api_key"}
                                            }).encode(), stop="invalid_api_key")
        out = await call(gateway, key, batch.endpoint.encode(), json.dumps(line.body).encode(), request_id)
        if out.preempted:
            return Outcome(0, b"", retry=True, again=True)
        code = _error_code(out.body) if out.status >= 400 else None
        if out.status == 429 and code == "budget_exceeded":
            return Outcome(out.status, out.body, stop="budget_exceeded")
        if out.status in (401, 403) and code in ("key_revoked", "key_expired", "invalid_api_key"):
            return Outcome(out.status, out.body, stop=code)
        return Outcome(out.status, out.body, retry=out.status in (429, 503))

    return execute


def _error_code(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) else None



