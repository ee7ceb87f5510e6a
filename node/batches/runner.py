"""Runs batches: checks the input, sends each line at batch priority, records each result once.

One task per active batch. A line's result is recorded in the database as soon as it is
known (`record_lines`, keyed by batch and line), and a batch resumed after a restart skips
every recorded line: a line that finished is never run again; a line that was in flight
when the node stopped runs again (at least once at the worker, exactly once in the output).
Blocking work (the check, database writes, output files) runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

from node.batches import lines as batch_lines
from node.batches.files import FileStore
from node.batches.records import ACTIVE, ENDPOINTS, BatchRecord, BatchStatus, FileRecord, LineResult, new_id

log = logging.getLogger("infernode.batches")

S = BatchStatus
READ_AHEAD = 256          # lines read from the input file at a time
SAVE_EVERY_S = 1.0        # progress (request_counts) is saved at most this often
RETRY_FIRST_S = 0.5       # a line the model could not take yet (busy, loading) is retried, backing off
RETRY_MAX_S = 30.0


class BatchStore(Protocol):
    """The database side (node/accounts/storage/batches.py)."""

    def get_batch(self, batch_id: str) -> BatchRecord | None: ...
    def save_batch(self, record: BatchRecord) -> None: ...
    def list_batches(self, key_id: str | None, team: str | None, after: str | None = None, limit: int = 20,
                     statuses: tuple[BatchStatus, ...] = ()) -> list[BatchRecord]: ...
    def record_lines(self, results: list[LineResult]) -> list[bool]: ...
    def recorded_lines(self, batch_id: str) -> set[int]: ...
    def line_counts(self, batch_id: str) -> tuple[int, int]: ...
    def iter_lines(self, batch_id: str, page: int = 1000) -> Iterator[LineResult]: ...
    def insert_file(self, record: FileRecord) -> None: ...
    def get_file(self, file_id: str) -> FileRecord | None: ...
    def list_files(self, key_id: str | None, team: str | None, purpose: str | None = None,
                   after: str | None = None, limit: int = 100) -> list[FileRecord]: ...
    def delete_file(self, file_id: str) -> bool: ...
    def insert_batch(self, record: BatchRecord) -> None: ...
    def batch_counts(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class Outcome:
    """What running one line gave: the answer's status and body, and why a refusal should stop the batch."""

    status: int
    body: bytes
    stop: str | None = None       # e.g. "budget_exceeded": no later line can succeed either
    retry: bool = False           # the model is busy or not ready: try the line again later
    again: bool = False           # preempted for interactive traffic: send it again at once


# (batch, line, request id) -> the answer; the node's gateway, in-process, at batch priority.
Execute = Callable[[BatchRecord, batch_lines.Line, str], Awaitable[Outcome]]


class BatchRunner:
    """Validates, runs, finalizes, expires and cancels batches; resumes them after a restart."""

    def __init__(self, store: BatchStore, files: FileStore, execute: Execute, *,
                 limits: batch_lines.Limits = batch_lines.Limits(),
                 model_problem: Callable[[BatchRecord, str], str | None] = lambda b, m: None,
                 concurrency: int = 8, clock: Callable[[], float] = time.time,
                 on_line: Callable[[str], None] = lambda result: None) -> None:
        self.store, self.files, self.execute = store, files, execute
        self.limits, self.model_problem = limits, model_problem
        self.concurrency, self.clock, self.on_line = concurrency, clock, on_line
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        self._recording: set[asyncio.Future[Any]] = set()
        self._pending: list[tuple[LineResult, asyncio.Future[bool]]] = []  # results for the next commit
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Resume what a previous run left: batches validating or active."""
        await asyncio.to_thread(self.files.sweep_partials)
        for status in (S.VALIDATING, *ACTIVE):
            after = None
            while True:
                page = await asyncio.to_thread(self.store.list_batches, None, None, after, 200, (status,))
                for b in page:
                    self.submit(b)
                if len(page) < 200:
                    break
                after = page[-1].id

    async def close(self) -> None:
        """Stop every batch task; lines in flight are not recorded and run again on the next start."""
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._recording:  # answers already given are recorded before the database closes
            await asyncio.gather(*self._recording, return_exceptions=True)

    def submit(self, batch: BatchRecord) -> None:
        """Run a batch (new, or resumed) in its own task, once."""
        if self._closed or batch.id in self._tasks:
            return
        self._cancel[batch.id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(batch), name=f"batch-{batch.id}")
        self._tasks[batch.id] = task
        task.add_done_callback(functools.partial(self._forget, batch.id))

    def _forget(self, batch_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(batch_id, None)
        self._cancel.pop(batch_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch %s stopped: %r", batch_id, task.exception())

    def running(self) -> int:
        return len(self._tasks)

    async def cancel(self, batch: BatchRecord) -> BatchRecord:
        """Cancel a batch: `cancelling` now, `cancelled` once its lines in flight have ended."""
        if batch.status in (S.VALIDATING, S.IN_PROGRESS):
            batch.move(S.CANCELLING, self.clock())
            await asyncio.to_thread(self.store.save_batch, batch)
        event = self._cancel.get(batch.id)
        if event is not None:
            event.set()
        elif batch.status is S.CANCELLING:
            self.submit(batch)  # nobody runs it (e.g. cancelled while this node was down): finish it
        return batch

    # -- one batch -------------------------------------------------------------------
    async def _save(self, batch: BatchRecord) -> None:
        await asyncio.to_thread(self.store.save_batch, batch)

    async def _run(self, batch: BatchRecord) -> None:
        if batch.status is S.VALIDATING:
            if not await self._validate(batch):
                return
        if batch.status is S.IN_PROGRESS:
            await self._lines(batch)
        if batch.status in (S.FINALIZING, S.CANCELLING) or (batch.status is S.IN_PROGRESS and self._expired(batch)):
            await self._finish(batch)

    def _expired(self, batch: BatchRecord) -> bool:
        return self.clock() >= batch.expires_at

    async def _validate(self, batch: BatchRecord) -> bool:
        path = self.files.path(batch.input_file_id)
        url = next(u for u, e in ENDPOINTS.items() if u == batch.endpoint)
        try:
            checked = await asyncio.to_thread(batch_lines.check, path, url, self.limits,
                                              lambda m: self.model_problem(batch, m))
        except FileNotFoundError:
            checked = batch_lines.Checked()
            checked.error("file_not_found", f"the input file {batch.input_file_id} is gone")
        now = self.clock()
        current = await asyncio.to_thread(self.store.get_batch, batch.id)
        if current is not None and current.status is S.CANCELLING:  # cancelled while it was checked
            batch.status, batch.cancelling_at = S.CANCELLING, current.cancelling_at
            await self._finish(batch)
            return False
        if checked.errors:
            batch.errors = checked.errors
            batch.move(S.FAILED, now)
            await self._save(batch)
            log.info("batch %s failed validation: %s", batch.id, checked.errors[0]["message"])
            return False
        batch.total = checked.lines
        batch.move(S.IN_PROGRESS, now)
        await self._save(batch)
        return True

    async def _lines(self, batch: BatchRecord) -> None:
        """Send every unrecorded line, `concurrency` at a time, until done, cancelled, expired or stopped."""
        done = await asyncio.to_thread(self.store.recorded_lines, batch.id)
        batch.completed, batch.failed = await asyncio.to_thread(self.store.line_counts, batch.id)
        cancel = self._cancel.get(batch.id) or asyncio.Event()
        stop: list[str] = []   # why the rest of the lines cannot run (e.g. the budget is spent)
        slots = asyncio.Semaphore(self.concurrency)
        inflight: set[asyncio.Task[None]] = set()
        last_save = [time.monotonic()]

        async def one(line: batch_lines.Line) -> None:
            try:
                rid = f"{batch.id}-{line.index}"
                delay = RETRY_FIRST_S
                while True:
                    try:
                        out = await self.execute(batch, line, rid)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # the gateway answers errors itself; this is a bug, kept per line
                        log.exception("batch %s line %d", batch.id, line.index)
                        out = Outcome(500, json.dumps({"error": {"message": f"internal error: {exc!r}"}}).encode())
                    if not out.retry or cancel.is_set() or stop or self._expired(batch):
                        break
                    if out.again:
                        self.on_line("preempted")
                        continue
                    # Busy or loading: a batch line waits its turn rather than failing.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                if out.retry and (cancel.is_set() or stop or self._expired(batch)):
                    return  # not recorded: the batch's end records it (cancelled, expired, budget)
                if out.stop and not stop:
                    stop.append(out.stop)
                result = LineResult(batch.id, line.index, line.custom_id, out.status,
                                    out.body.decode("utf-8", "replace"), None, None, rid, self.clock())
                await self._record(batch, result)
                if time.monotonic() - last_save[0] > SAVE_EVERY_S:
                    last_save[0] = time.monotonic()
                    await self._save(batch)
            finally:
                slots.release()

        async def on_cancel() -> None:  # lines in flight are abandoned, and cancelled at the worker
            await cancel.wait()
            for t in list(inflight):
                t.cancel()

        watcher = asyncio.get_running_loop().create_task(on_cancel())
        reader = batch_lines.read(self.files.path(batch.input_file_id))
        try:
            while not cancel.is_set() and not stop:
                chunk = await asyncio.to_thread(lambda: list(islice(reader, READ_AHEAD)))
                if not chunk:
                    break
                for line in chunk:
                    if line.index in done:
                        continue
                    await slots.acquire()
                    if cancel.is_set() or stop or self._expired(batch):
                        slots.release()
                        break
                    t = asyncio.get_running_loop().create_task(one(line))
                    inflight.add(t)
                    t.add_done_callback(inflight.discard)
                else:
                    continue
                break
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        finally:
            watcher.cancel()
            for t in list(inflight):  # the runner is closing: nothing outlives it (unrecorded lines rerun)
                t.cancel()
            reader.close()
        if stop:
            await self._fail_rest(batch, stop[0], _STOP_MESSAGES.get(stop[0], stop[0]))
        current = await asyncio.to_thread(self.store.get_batch, batch.id)
        if cancel.is_set() or (current is not None and current.status is S.CANCELLING):
            if batch.status is not S.CANCELLING:
                batch.status, batch.cancelling_at = S.CANCELLING, (current.cancelling_at if current else self.clock())
            return
        if self._expired(batch):
            return
        batch.move(S.FINALIZING, self.clock())
        await self._save(batch)

    async def _record(self, batch: BatchRecord, result: LineResult) -> None:
        # An answer the worker gave is recorded even when the runner is stopping: its future is
        # shielded, the writer is a task of its own, and `close` waits for both.
        job: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((result, job))
        self._recording.add(job)
        job.add_done_callback(self._recording.discard)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())
            self._recording.add(self._writer)
            self._writer.add_done_callback(self._recording.discard)
        if await asyncio.shield(job):
            if result.ok:
                batch.completed += 1
            else:
                batch.failed += 1
            self.on_line("completed" if result.ok else "failed")

    async def _write_pending(self) -> None:
        """Group commit: the results that came while the last commit ran go in the next, one transaction."""
        while self._pending:
            group, self._pending = self._pending, []
            try:
                new = await asyncio.to_thread(self.store.record_lines, [r for r, _ in group])
            except Exception as exc:  # each line's task fails as a single insert would have
                for _, job in group:
                    job.set_exception(exc)
                continue
            for (_, job), fresh in zip(group, new, strict=True):
                job.set_result(fresh)

    async def _fail_rest(self, batch: BatchRecord, code: str, message: str) -> None:
        """Record every line not yet recorded as failed with `code` (expired, cancelled, budget spent)."""
        done = await asyncio.to_thread(self.store.recorded_lines, batch.id)
        reader = batch_lines.read(self.files.path(batch.input_file_id))
        try:
            while True:
                chunk = await asyncio.to_thread(lambda: list(islice(reader, READ_AHEAD)))
                if not chunk:
                    break
                for line in chunk:
                    if line.index not in done:
                        rid = f"{batch.id}-{line.index}"
                        await self._record(batch, LineResult(batch.id, line.index, line.custom_id, 0, None, code,
                                                             message, rid, self.clock()))
        finally:
            reader.close()

    async def _finish(self, batch: BatchRecord) -> None:
        """Write the output and error files, then end the batch: completed, expired or cancelled."""
        if batch.status is S.CANCELLING:
            end, code = S.CANCELLED, "batch_cancelled"
        elif self._expired(batch) and batch.status is S.IN_PROGRESS:
            end, code = S.EXPIRED, "batch_expired"
        else:
            end, code = S.COMPLETED, ""
        if code and batch.total:
            await self._fail_rest(batch, code, _STOP_MESSAGES[code])
        batch.completed, batch.failed = await asyncio.to_thread(self.store.line_counts, batch.id)
        batch.output_file_id, batch.error_file_id = await asyncio.to_thread(self._write_outputs, batch)
        batch.move(end, self.clock())
        await self._save(batch)
        log.info("batch %s %s: %d completed, %d failed", batch.id, end.value, batch.completed, batch.failed)

    def _write_outputs(self, batch: BatchRecord) -> tuple[str | None, str | None]:
        """The output file (answered lines) and the error file (the rest), in input order. Blocking."""
        ids: list[str | None] = []
        for want_ok, suffix in ((True, "output"), (False, "error")):
            rows = (r.output_line() for r in self.store.iter_lines(batch.id)
                    if (r.error_code is None and r.status_code < 400) is want_ok)
            first = next(rows, None)
            if first is None:
                ids.append(None)
                continue
            fid = new_id("file-")
            size = self.files.write(fid, _chain_first(first, rows))
            lines = 0
            with self.files.path(fid).open("rb") as f:
                lines = sum(1 for _ in f)
            self.store.insert_file(FileRecord(fid, batch.key_id, batch.team, "batch_output",
                                              f"{batch.id}_{suffix}.jsonl", size, lines, self.clock(), suffix))
            ids.append(fid)
        return ids[0], ids[1]


def _chain_first(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


_STOP_MESSAGES: dict[str, Any] = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed: the batch was cancelled.",
    "budget_exceeded": "This request was not executed: the key's budget is spent.",
    "invalid_api_key": "This request was not executed: the batch's API key no longer exists.",
    "key_revoked": "This request was not executed: the batch's API key was revoked.",
    "key_expired": "This request was not executed: the batch's API key has expired.",
}
