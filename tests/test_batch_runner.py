"""The batch runner against a real database (SQLite, and PostgreSQL when configured): resume, record
once, expiry (an injected clock), cancel, budget stop, retries. Lines run through a plain function here;
tests/test_batches.py runs them through a real node."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.accounts.storage import open_storage
from node.batches.files import FileStore
from node.batches.lines import Line
from node.batches.records import BatchRecord, BatchStatus, FileRecord, LineResult
from node.batches.runner import BatchRunner, Outcome
from node.batches.service import Batches, Owner
from tests.test_storage import make_db_url

S = BatchStatus


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path) -> Iterator:
    for url in make_db_url(request.param, tmp_path):
        s = open_storage(url)
        s.migrate()
        yield s
        s.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Worker:
    """Answers lines; counts how often each line ran; can hold lines until released."""

    def __init__(self, answer=None) -> None:
        self.calls: list[int] = []
        self.gate: asyncio.Event | None = None
        self.answer = answer or (lambda line: Outcome(200, json.dumps({"echo": line.custom_id}).encode()))

    async def __call__(self, batch: BatchRecord, line: Line, rid: str) -> Outcome:
        self.calls.append(line.index)
        if self.gate is not None:
            await self.gate.wait()
        return self.answer(line)


def setup(store, tmp_path, worker, n=10, clock=None, concurrency=4) -> tuple[Batches, BatchRunner]:
    files = FileStore(tmp_path / "files")
    runner = BatchRunner(store, files, worker, concurrency=concurrency, clock=clock or Clock())
    return Batches(store, files, runner, runner.limits), runner


def input_file(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "m", "messages": []}}).encode() + b"\n" for i in range(n))


async def create(batches: Batches, n: int) -> BatchRecord:
    f = await batches.upload("key_a", None, "in.jsonl", "batch", input_file(n))
    return await batches.create("key_a", None, {"input_file_id": f.id, "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h"})


async def until(batches: Batches, bid: str, *statuses: BatchStatus, timeout: float = 20) -> BatchRecord:
    for _ in range(int(timeout / 0.02)):
        b = await batches.batch(Owner(None, None), bid)
        if b.status in statuses:
            return b
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch {bid} is {b.status}, not {statuses}")


def output(batches: Batches, b: BatchRecord, fid: str | None) -> list[dict]:
    return [json.loads(x) for x in batches.files.read(fid).splitlines()] if fid else []


def test_a_batch_runs_every_line_once_and_writes_outputs(store, tmp_path):
    async def go():
        worker = Worker(lambda line: Outcome(400 if line.index == 3 else 200, b'{"ok": true}'))
        batches, runner = setup(store, tmp_path, worker)
        b = await until(batches, (await create(batches, 10)).id, S.COMPLETED)
        assert sorted(worker.calls) == list(range(10))
        assert (b.total, b.completed, b.failed) == (10, 9, 1)
        out, err = output(batches, b, b.output_file_id), output(batches, b, b.error_file_id)
        assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(10) if i != 3]
        assert out[0]["response"]["status_code"] == 200 and out[0]["response"]["body"] == {"ok": True}
        assert [e["custom_id"] for e in err] == ["c3"] and err[0]["response"]["status_code"] == 400
        wire = b.wire()
        assert wire["request_counts"] == {"total": 10, "completed": 9, "failed": 1}
        assert wire["completed_at"] and wire["finalizing_at"] and wire["in_progress_at"]
        await runner.close()
    asyncio.run(go())


def test_a_restart_resumes_and_never_reruns_a_recorded_line(store, tmp_path):
    async def go():
        worker = Worker()
        worker.gate = asyncio.Event()
        clock = Clock()
        batches, runner = setup(store, tmp_path, worker, clock=clock, concurrency=3)
        b = await create(batches, 12)
        await until(batches, b.id, S.IN_PROGRESS)
        for _ in range(100):
            if len(worker.calls) == 3:
                break
            await asyncio.sleep(0.01)
        # Three lines are in flight; record one as if it had finished just before the stop.
        assert store.record_lines([LineResult(b.id, 0, "c0", 200, '{"x": 1}', None, None, "r", clock())]) == [True]
        await runner.close()   # the node stops: lines in flight are not recorded
        assert store.get_batch(b.id).status is S.IN_PROGRESS
        again = Worker()
        batches2, runner2 = setup(store, tmp_path, again, clock=clock)
        await runner2.start()
        done = await until(batches2, b.id, S.COMPLETED)
        assert 0 not in again.calls and sorted(again.calls) == list(range(1, 12))
        assert (done.completed, done.failed) == (12, 0)
        assert [o["custom_id"] for o in output(batches2, done, done.output_file_id)] == [f"c{i}" for i in range(12)]
        assert store.record_lines([LineResult(b.id, 5, "c5", 200, "{}", None, None, "r", 0)]) == [False]
        await runner2.close()
    asyncio.run(go())


def test_expiry_with_an_injected_clock(store, tmp_path):
    async def go():
        clock = Clock()
        worker = Worker()

        def slow(line: Line) -> Outcome:
            if line.index == 4:
                clock.now += 86401   # the window passes while line 4 runs
            return Outcome(200, b"{}")
        worker.answer = slow
        batches, runner = setup(store, tmp_path, worker, clock=clock, concurrency=1)
        b = await until(batches, (await create(batches, 10)).id, S.EXPIRED)
        assert sorted(worker.calls) == list(range(5)) and (b.completed, b.failed) == (5, 5)
        err = output(batches, b, b.error_file_id)
        assert {e["error"]["code"] for e in err} == {"batch_expired"} and len(err) == 5
        assert b.wire()["expired_at"] is not None
        await runner.close()
    asyncio.run(go())


def test_cancel_stops_dispatching_and_ends_cancelled(store, tmp_path):
    async def go():
        worker = Worker()
        worker.gate = asyncio.Event()
        batches, runner = setup(store, tmp_path, worker, concurrency=2)
        b = await create(batches, 20)
        await until(batches, b.id, S.IN_PROGRESS)
        await asyncio.sleep(0.05)
        cancelled = await batches.cancel(Owner("key_a", None), b.id)
        assert cancelled.status is S.CANCELLING
        b = await until(batches, b.id, S.CANCELLED)
        assert len(worker.calls) == 2 and b.failed == 20 and b.completed == 0
        with pytest.raises(Exception, match="already cancelled"):
            await batches.cancel(Owner("key_a", None), b.id)
        await runner.close()
    asyncio.run(go())


def test_a_spent_budget_fails_the_remaining_lines(store, tmp_path):
    async def go():
        worker = Worker(lambda line: Outcome(429, b'{"error": {"code": "budget_exceeded"}}', stop="budget_exceeded")
                        if line.index >= 3 else Outcome(200, b"{}"))
        batches, runner = setup(store, tmp_path, worker, concurrency=1)
        b = await until(batches, (await create(batches, 10)).id, S.COMPLETED)
        assert (b.completed, b.failed) == (3, 7) and len(worker.calls) == 4
        codes = [e["error"]["code"] if e["error"] else e["response"]["status_code"]
                 for e in output(batches, b, b.error_file_id)]
        assert codes == [429] + ["budget_exceeded"] * 6
        await runner.close()
    asyncio.run(go())


def test_a_busy_model_is_retried_not_failed(store, tmp_path, monkeypatch):
    monkeypatch.setattr("node.batches.runner.RETRY_FIRST_S", 0.01)
    async def go():
        tries: dict[int, int] = {}

        def flaky(line: Line) -> Outcome:
            tries[line.index] = tries.get(line.index, 0) + 1
            return Outcome(503, b"{}", retry=True) if tries[line.index] < 3 else Outcome(200, b"{}")
        batches, runner = setup(store, tmp_path, Worker(flaky))
        b = await until(batches, (await create(batches, 4)).id, S.COMPLETED)
        assert (b.completed, b.failed) == (4, 0) and set(tries.values()) == {3}
        await runner.close()
    asyncio.run(go())


def test_a_preempted_line_is_sent_again_at_once_and_counted(store, tmp_path, monkeypatch):
    monkeypatch.setattr("node.batches.runner.RETRY_FIRST_S", 30.0)   # a backoff would time the test out
    async def go():
        tries: dict[int, int] = {}
        seen: list[str] = []

        def preempted_twice(line: Line) -> Outcome:
            tries[line.index] = tries.get(line.index, 0) + 1
            return Outcome(0, b"", retry=True, again=True) if tries[line.index] <= 2 else Outcome(200, b"{}")
        batches, runner = setup(store, tmp_path, Worker(preempted_twice))
        runner.on_line = seen.append
        b = await until(batches, (await create(batches, 4)).id, S.COMPLETED, timeout=10)
        assert (b.completed, b.failed) == (4, 0) and set(tries.values()) == {3}
        assert sorted(seen) == ["completed"] * 4 + ["preempted"] * 8
        assert len(list(store.iter_lines(b.id))) == 4   # recorded once each
        await runner.close()
    asyncio.run(go())


def test_owners_see_only_their_own(store, tmp_path):
    async def go():
        batches, runner = setup(store, tmp_path, Worker())
        b = await create(batches, 2)
        assert (await batches.batch(Owner("key_a", None), b.id)).id == b.id
        with pytest.raises(Exception, match="no such batch"):
            await batches.batch(Owner("key_b", None), b.id)
        with pytest.raises(Exception, match="no such file"):
            await batches.file(Owner("key_b", None), b.input_file_id)
        assert await batches.list(Owner("key_b", None), None, 10) == []
        assert [x.id for x in await batches.list(Owner(None, None), None, 10)] == [b.id]
        await until(batches, b.id, S.COMPLETED)
        await runner.close()
    asyncio.run(go())


def test_files_are_owner_only_and_paged(store, tmp_path):
    async def go():
        batches, runner = setup(store, tmp_path, Worker())
        made = [await batches.upload("key_a", None, f"f{i}.jsonl", "batch", b"{}\n") for i in range(5)]
        assert (tmp_path / "files").stat().st_mode & 0o777 == 0o700
        assert {(tmp_path / "files" / f.id).stat().st_mode & 0o777 for f in made} == {0o600}
        owner = Owner("key_a", None)
        first = await batches.list_files(owner, None, None, 2)
        rest = await batches.list_files(owner, None, first[-1].id, 10)
        assert len(first) == 2 and len(rest) == 3 and {f.id for f in first + rest} == {f.id for f in made}
        await batches.delete(owner, made[0].id)
        assert not (tmp_path / "files" / made[0].id).exists()
        assert isinstance(made[1], FileRecord)
        await runner.close()
    asyncio.run(go())


def test_an_answer_given_is_recorded_even_when_the_runner_stops_meanwhile(store, tmp_path):
    import threading
    import time as _time

    class SlowStore:
        """The real store, with line records that take a while (a busy database)."""

        def __init__(self, inner) -> None:
            self.inner, self.started = inner, threading.Event()

        def record_lines(self, results):
            self.started.set()
            _time.sleep(0.3)
            return self.inner.record_lines(results)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    async def go():
        slow = SlowStore(store)
        worker = Worker()
        batches, runner = setup(slow, tmp_path, worker, concurrency=1)
        b = await create(batches, 5)
        while not slow.started.is_set():
            await asyncio.sleep(0.005)
        await runner.close()          # stops while the first answer is being recorded
        assert store.recorded_lines(b.id) >= {0}
    asyncio.run(go())
