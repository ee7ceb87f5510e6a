"""One file of a pull: over one connection, or as byte ranges over several at once.

A file larger than the smallest segment is split (node.supply.segments): its partial
file is preallocated (a full disk fails here, before any byte is fetched), each range
is fetched on a connection of its own and written in place at its offset, and its
progress is saved beside the partial so a kill loses little. One thread per file
hashes the contiguous prefix as it grows, mapping from the page cache (re-reading
from disk what arrived long before its turn), so memory stays bounded whatever the
file's size; the digest is checked over the whole file before the rename into the
store. The first range request is the probe: a server that answers it 200 (no Range)
gets the file over that one connection instead.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from node.supply import segments
from node.supply.bulkhttp import BulkClient, BulkResponse
from node.supply.download import (
    CONTENT_RANGE,
    HASH_BATCH,
    NetSettings,
    PullCancelled,
    Retry,
    fetch_into,
    read_body,
    refused,
    retrying,
    splice_body,
    take_whole,
)
from node.supply.lockfile import LockedFile
from node.supply.progress import PullProgress
from node.supply.segments import Segment
from node.supply.store import BlobWriter, DigestMismatch, DiskFull, SizeMismatch, Store, drain_pipe

SAVE_EVERY_S = 1.0  # how much a kill may cost per file: what arrived since the last save
POLL_S = 0.05


@dataclass(frozen=True)
class FileJob:
    """One blob to fetch, and what its pull needs to report on it."""

    locked: LockedFile
    url: str
    headers: dict[str, str]
    label: str
    priority: int  # the pull's order: largest first


Submit = Callable[[tuple[int, ...], Callable[[], None]], None]
Finished = Callable[[BaseException | None], None]


def fetch_file(store: Store, client: BulkClient, job: FileJob, settings: NetSettings, progress: PullProgress,
               submit: Submit, cancel: threading.Event, finished: Finished) -> None:
    """Fetch one blob into the store (runs on a pool thread); `finished` is called once, with its error."""
    if cancel.is_set():
        return finished(PullCancelled(f"{job.locked.path}: interrupted before it started; pull again"))
    writer = store.writer(job.locked)
    try:
        writer.__enter__()
    except BaseException as exc:
        return finished(exc)
    state = segments.state_path(store, job.locked)
    try:
        if writer.present:
            segments.remove(state)
            progress.start(job.label, job.locked.size, job.locked.size)
            progress.finish(job.label, True)
            writer.__exit__()
            return finished(None)
        segs = _resume_or_plan(writer, state, settings)
    except BaseException as exc:
        writer.__exit__()
        progress.start(job.label, job.locked.size, 0)
        progress.finish(job.label, False, getattr(exc, "message", str(exc)))
        return finished(exc)
    if segs is None:
        return _one_stream(client, job, writer, settings, progress, cancel, finished)
    RangedFile(client, job, writer, segs, settings, progress, submit, cancel, finished).run()


def _resume_or_plan(writer: BlobWriter, path: Path, settings: NetSettings) -> list[Segment] | None:
    """The file's saved segments, or new ones (state saved, file preallocated); None: one stream."""
    locked = writer.locked
    segs = segments.load(path, locked) if path.exists() else None
    if segs is None:
        if path.exists():  # a state that cannot be read: what its partial holds is unknown
            segments.remove(path)
            writer.reset()
        segs = segments.plan(locked.size, writer.offset, settings.parallel, settings.min_segment)
        if segs is None:
            return None
        segments.save(path, locked, [(s.start, s.end, s.done) for s in segs])
        try:
            os.posix_fallocate(writer.fd, 0, locked.size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                writer.discard()
                segments.remove(path)
                raise DiskFull(f"{locked.path}: disk full in {writer.store.root} ({locked.size} bytes do not fit); "
                               "free space and pull again") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(writer.fd, locked.size)  # a filesystem without fallocate: sparse, checked per write
    writer.offset, writer.hashed = _prefix(segs, locked.size), 0
    return segs


def _prefix(segs: list[Segment], size: int) -> int:
    """Where the contiguous bytes from the start end: the first unfinished segment's position."""
    return next((s.pos for s in segs if not s.finished), size)


def _one_stream(client: BulkClient, job: FileJob, writer: BlobWriter, settings: NetSettings,
                progress: PullProgress, cancel: threading.Event, finished: Finished) -> None:
    err: BaseException | None = None
    progress.start(job.label, job.locked.size, writer.offset)
    try:
        fetch_into(client, job.url, writer, settings, headers=job.headers,
                   on_bytes=lambda n: progress.advance(job.label, n), cancel=cancel)
        writer.commit()
    except BaseException as exc:
        err = exc
    writer.__exit__()
    progress.finish(job.label, err is None, "" if err is None else getattr(err, "message", str(err)))
    finished(err)


class RangedFile:
    """A file whose segments are fetched on pool threads; the last one to end commits or keeps it."""

    def __init__(self, client: BulkClient, job: FileJob, writer: BlobWriter, segs: list[Segment],
                 settings: NetSettings, progress: PullProgress, submit: Submit, cancel: threading.Event,
                 finished: Finished) -> None:
        self.client, self.job, self.writer, self.segs = client, job, writer, segs
        self.settings, self.progress, self.submit, self.cancel, self.finished = settings, progress, submit, cancel, finished
        self.size = job.locked.size
        self.state = segments.state_path(writer.store, job.locked)
        self.stop = _Stop(cancel)  # a segment failed, or the pull was cancelled: the others end too
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._left = 1  # segments whose job has not ended; the probe's first
        self.ranged = False  # a 206 came back: the other segments are queued
        self.direct: tuple[str, dict[str, str]] | None = None  # the redirect's target, and the headers it gets
        self.whole = False  # the server ignored Range: the file came over one connection
        self._done = threading.Event()
        self._hasher = threading.Thread(target=self._hash_loop, name="pull-hash", daemon=True)

    def run(self) -> None:
        """Fetch the first unfinished segment here, as the probe; the rest follow once ranges work."""
        self.progress.start(self.job.label, self.size, sum(s.done for s in self.segs))
        self._run(next((s for s in self.segs if not s.finished), self.segs[-1]))

    def _run(self, seg: Segment) -> None:
        try:
            retrying(self.job.locked.path, self.job.url, self.settings, self.stop, lambda: seg.pos, seg.end,
                     lambda: self._attempt(seg))
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self._finish()

    def _attempt(self, seg: Segment) -> None:
        url, headers = self.direct or (self.job.url, self.job.headers)
        with self.client.get(url, {**headers, "range": f"bytes={seg.pos}-{seg.end - 1}"}) as r:
            code = r.status
            if self.direct is not None and 400 <= code < 500 and code not in (408, 429):
                self.direct = None  # a signed CDN address that expired: ask the origin again
                raise Retry(f"HTTP {code} from {url}")
            if code >= 500 or code in (408, 429):
                raise Retry(f"HTTP {code}")
            if code == 200 and not self.ranged:
                return self._whole_file(r)
            if code == 200:
                raise Retry("HTTP 200 to a Range request: the server stopped honouring Range")
            if code != 206:
                raise refused(self.job.locked.path, self.job.url, code)
            m = CONTENT_RANGE.match(r.header("content-range") or "")
            if not m or int(m.group(1)) != seg.pos or int(m.group(2)) >= seg.end:
                raise Retry(f"bad Content-Range {r.header('content-range')!r} for bytes {seg.pos}-{seg.end - 1}")
            if m.group(3) != "*" and int(m.group(3)) != self.size:
                self._discard()
                raise SizeMismatch(f"{self.job.locked.path}: the server has {m.group(3)} bytes, "
                                   f"models.lock pins {self.size}; the source changed")
            if not self.ranged:
                self._start_ranges(seg, r.url)
            sink = _SegmentSink(self, seg)
            raw = r.raw_body()
            if raw is not None:
                splice_body(*raw, sink, sink.arrived, [], self.stop, self.settings.stall_timeout_s)
            else:
                read_body(r, sink, sink.arrived, [], self.stop)

    def _start_ranges(self, probe: Segment, final_url: str) -> None:
        """Ranges work: hash as the prefix grows, and queue every other unfinished segment.

        The other segments go straight to where the probe was redirected (the Hub's CDN,
        a registry's storage), without the origin's Authorization when that is elsewhere.
        """
        if final_url != self.job.url:
            same = urlsplit(final_url)[:2] == urlsplit(self.job.url)[:2]
            self.direct = (final_url, {k: v for k, v in self.job.headers.items() if same or k.lower() != "authorization"})
        self.ranged = True
        self._hasher.start()
        rest = [s for s in self.segs if not s.finished and s is not probe]
        with self._lock:
            self._left += len(rest)
        for i, s in enumerate(rest, 1):
            self.submit((self.job.priority, i), lambda s=s: self._run(s))  # type: ignore[misc]

    def _whole_file(self, r: BulkResponse) -> None:
        """The server ignored Range: take this answer's whole body as the file, on this one connection."""
        self.whole = True
        had = sum(s.done for s in self.segs)
        segments.remove(self.state)
        self.writer.reset()
        on_bytes = lambda n: self.progress.advance(self.job.label, n)  # noqa: E731
        if had:
            on_bytes(-had)
        with contextlib.suppress(OSError, http.client.HTTPException, Retry):  # a short body: fetch_into resumes it
            take_whole(r, self.writer, self.settings, on_bytes, self.stop)
        r.close()
        fetch_into(self.client, self.job.url, self.writer, self.settings, headers=self.job.headers,
                   on_bytes=on_bytes, cancel=self.stop)  # a drop midway: resumed (or restarted) as one stream
        for s in self.segs:
            s.done = s.end - s.start

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def _discard(self) -> None:
        self.stop.set()
        self.writer.discard()
        segments.remove(self.state)

    def save(self) -> None:
        """Flush what arrived, then record it (in that order: the state never claims unflushed bytes)."""
        snapshot = [(s.start, s.end, s.done) for s in self.segs]
        with contextlib.suppress(OSError):  # no state saved: the next pull fetches a little more again
            os.fdatasync(self.writer.fd)
            if self.writer.path.exists():
                segments.save(self.state, self.job.locked, snapshot)

    def _hash_loop(self) -> None:
        saved = time.monotonic()
        try:
            while not self._done.wait(POLL_S):
                self.writer.offset = _prefix(self.segs, self.size)
                if self.writer.offset - self.writer.hashed >= HASH_BATCH:
                    self.writer.hash_through(self.writer.offset)
                if time.monotonic() - saved >= SAVE_EVERY_S and not self.stop.is_set():
                    self.save()
                    saved = time.monotonic()
        except BaseException as exc:  # an unreadable partial: the file fails, the pull goes on
            self._fail(exc)

    def _finish(self) -> None:
        self._done.set()
        if self._hasher.is_alive():
            self._hasher.join()
        err = self.error
        if err is None:
            try:
                self.writer.offset = _prefix(self.segs, self.size)
                self.writer.commit()
                segments.remove(self.state)
            except BaseException as exc:
                err = exc
        if err is not None:
            if isinstance(err, (SizeMismatch, DigestMismatch, DiskFull)) or not self.writer.path.exists():
                segments.remove(self.state)
            elif not self.whole:
                self.save()
        self.writer.__exit__()
        self.progress.finish(self.job.label, err is None, "" if err is None else getattr(err, "message", str(err)))
        self.finished(err)


class _Stop:
    """Set when one segment failed; also set, as seen by every segment, when the whole pull is cancelled."""

    def __init__(self, cancel: threading.Event) -> None:
        self._own, self._cancel = threading.Event(), cancel

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or self._cancel.is_set()


class _SegmentSink:
    """Where one segment's bytes go: the partial file at the segment's position (download's receivers write here)."""

    def __init__(self, f: RangedFile, seg: Segment) -> None:
        self.f, self.seg, self.locked = f, seg, f.job.locked
        self._no_splice = False

    @property
    def offset(self) -> int:
        return self.seg.pos

    def arrived(self, n: int) -> None:
        self.f.progress.advance(self.f.job.label, n)

    def _room(self, n: int) -> None:
        if self.seg.pos + n > self.seg.end:
            raise Retry(f"more bytes than the range bytes {self.seg.start}-{self.seg.end - 1} asked for")

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._room(len(data))
        view = memoryview(data)
        while view:
            with self._disk():
                n = os.pwrite(self.f.writer.fd, view, self.seg.pos)
            view = view[n:]
            self.seg.done += n

    def splice_in(self, pipe_r: int, n: int) -> None:
        self._room(n)
        while n and not self._no_splice:
            try:
                with self._disk():
                    moved = os.splice(pipe_r, self.f.writer.fd, n, offset_dst=self.seg.pos)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._no_splice = True  # a filesystem that cannot take splice: copy through memory
                break
            if not moved:
                raise OSError(errno.EIO, "splice moved no bytes")
            n -= moved
            self.seg.done += moved
        drain_pipe(pipe_r, n, self.append)

    @contextlib.contextmanager
    def _disk(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # a sparse file (no fallocate here) met a full disk
                self.f._discard()
                raise DiskFull(f"{self.locked.path}: disk full in {self.f.writer.store.root}; free space and pull again") from None
            raise
