"""One HTTP download into a store blob: Range resume, retries with backoff, stall timeout.

The bytes go straight into a `BlobWriter`, which hashes them as they are written, so
a download is verified without a second read pass. Anything short of a verified blob
leaves at most a partial file under `store/partial/`, which the next attempt (or the
next `infernode pull`, after a kill) resumes with `Range: bytes=<have>-`.
"""

from __future__ import annotations

import http.client
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from node.errors import StoreError
from node.supply.bulkhttp import BulkClient, BulkResponse
from node.supply.store import BlobWriter, SizeMismatch

CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
READ_SIZE = 256 * 1024  # small enough that a failed read loses little
SYNC_EVERY = 64 * 1024 * 1024


class RemoteError(StoreError):
    """A source that cannot be reached or refuses us (after retries where retrying helps)."""


class PullCancelled(StoreError):
    """The pull was interrupted (Ctrl-C, shutdown); what arrived is kept for a resume."""


class _Retry(Exception):
    """A failure worth another attempt (5xx, 429, a reset, a stall, a short body)."""


@dataclass(frozen=True)
class NetSettings:
    """How hard to try: parallel files, attempts, backoff and the stall timeout."""

    parallel: int = 4
    retries: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 15.0
    stall_timeout_s: float = 30.0
    connect_timeout_s: float = 15.0

    @classmethod
    def from_env(cls) -> NetSettings:
        """Defaults, overridden by INFERNODE_PULL_{PARALLEL,RETRIES,BACKOFF_S,STALL_S}."""
        env = os.environ
        return cls(
            parallel=max(1, int(env.get("INFERNODE_PULL_PARALLEL", cls.parallel))),
            retries=max(0, int(env.get("INFERNODE_PULL_RETRIES", cls.retries))),
            backoff_s=float(env.get("INFERNODE_PULL_BACKOFF_S", cls.backoff_s)),
            stall_timeout_s=float(env.get("INFERNODE_PULL_STALL_S", cls.stall_timeout_s)),
        )

    def client(self) -> httpx.Client:
        """An httpx client with the stall timeout as its read timeout; redirects followed."""
        timeout = httpx.Timeout(connect=self.connect_timeout_s, read=self.stall_timeout_s,
                                write=self.stall_timeout_s, pool=None)
        # Cross-origin redirects (Hub -> CDN) drop Authorization: httpx does that itself.
        return httpx.Client(timeout=timeout, follow_redirects=True, headers={"accept-encoding": "identity"})

    def bulk_client(self) -> BulkClient:
        """The client blob bodies are read with (see node.bulkhttp for why not httpx)."""
        return BulkClient(timeout_s=self.stall_timeout_s)

    def sleep_before(self, attempt: int) -> None:
        """Exponential backoff with jitter, so many boxes do not retry in step."""
        delay = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
        time.sleep(delay * (0.5 + random.random() / 2))


def fetch_into(client: BulkClient, url: str, writer: BlobWriter, settings: NetSettings, *,
               headers: dict[str, str] | None = None, on_bytes: Callable[[int], None] | None = None,
               cancel: threading.Event | None = None) -> None:
    """Fill `writer` from `url` up to the locked size, resuming and retrying as needed."""
    size = writer.locked.size
    attempt, last = 0, ""
    while writer.offset < size:
        if cancel is not None and cancel.is_set():
            raise PullCancelled(f"{writer.locked.path}: interrupted at byte {writer.offset}; pull again to resume")
        before = writer.offset
        try:
            _one_attempt(client, url, writer, headers or {}, on_bytes, cancel)
        except _Retry as exc:
            last = str(exc)
        except (OSError, http.client.HTTPException) as exc:  # reset, refused, stall (timeout), TLS, short body
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if writer.offset >= size:
            return
        if writer.offset > before:
            attempt = 0  # progress was made: a flaky link is not a dead one
        attempt += 1
        if attempt > settings.retries:
            raise RemoteError(f"{writer.locked.path}: {url}: gave up after {settings.retries} retries "
                              f"at byte {writer.offset} of {size}: {last}")
        settings.sleep_before(attempt)


def _one_attempt(client: BulkClient, url: str, writer: BlobWriter, headers: dict[str, str],
                 on_bytes: Callable[[int], None] | None, cancel: threading.Event | None) -> None:
    size, path = writer.locked.size, writer.locked.path
    h = dict(headers)
    if writer.offset:
        h["range"] = f"bytes={writer.offset}-"
    with client.get(url, h) as r:
        code = r.status
        if code == 416 and writer.offset:
            _restart(writer, on_bytes)  # our partial is longer than what the server has: start over
            raise _Retry("HTTP 416 for our resume offset")
        if code >= 500 or code in (408, 429):
            raise _Retry(f"HTTP {code}")
        if code == 206:
            m = CONTENT_RANGE.match(r.header("content-range") or "")
            if not m or int(m.group(1)) != writer.offset:
                _restart(writer, on_bytes)
                raise _Retry(f"bad Content-Range {r.header('content-range')!r}")
            if m.group(3) != "*" and int(m.group(3)) != size:
                writer.discard()
                raise SizeMismatch(f"{path}: the server has {m.group(3)} bytes, models.lock pins {size}; the source changed")
        elif code == 200:
            if writer.offset:
                _restart(writer, on_bytes)  # Range ignored: the body starts at byte 0
            length = r.header("content-length")
            if length is not None and int(length) != size:
                writer.discard()
                raise SizeMismatch(f"{path}: the server has {length} bytes, models.lock pins {size}; the source changed")
        else:
            hint = " (set HF_TOKEN for gated or private repos)" if code in (401, 403) else ""
            raise RemoteError(f"{path}: {url}: HTTP {code}{hint}")
        _pump(r, writer, on_bytes, cancel)
    if writer.offset < size:
        raise _Retry(f"connection closed at byte {writer.offset} of {size}")


def _restart(writer: BlobWriter, on_bytes: Callable[[int], None] | None) -> None:
    """Throw away the partial bytes (and take them back from the progress count)."""
    had = writer.offset
    writer.reset()
    if on_bytes and had:
        on_bytes(-had)


def _pump(r: BulkResponse, writer: BlobWriter, on_bytes: Callable[[int], None] | None,
          cancel: threading.Event | None = None) -> None:
    """Receive on this thread while another writes and hashes, so neither waits on the other.

    Every byte that arrived before a failure is still written, so the next attempt
    resumes right after it.
    """
    q: queue.Queue[bytearray | None] = queue.Queue(maxsize=8)
    failed: list[BaseException] = []
    flush_due, done = threading.Event(), threading.Event()

    def drain() -> None:
        unsynced = 0
        while (data := q.get()) is not None:
            if failed:
                continue
            try:
                writer.write(data)
                if on_bytes:
                    on_bytes(len(data))
            except BaseException as exc:  # handed to the receiving thread below
                failed.append(exc)
            unsynced += len(data)
            if unsynced >= SYNC_EVERY:
                unsynced = 0
                flush_due.set()

    def flusher() -> None:
        # Write back while receiving, so the fsync before the rename finds little left.
        while True:
            flush_due.wait()
            flush_due.clear()
            if done.is_set():
                return
            writer.sync()

    t = threading.Thread(target=drain, name="pull-write", daemon=True)
    f = threading.Thread(target=flusher, name="pull-sync", daemon=True)
    t.start()
    f.start()
    try:
        while not failed:
            if cancel is not None and cancel.is_set():
                raise PullCancelled(f"{writer.locked.path}: interrupted at byte {writer.offset}; pull again to resume")
            chunk = bytearray(READ_SIZE)  # a fresh buffer: the writer thread may still hold the last one
            with memoryview(chunk) as view:
                n = r.readinto(view)
            if not n:
                break
            q.put(chunk if n == READ_SIZE else chunk[:n])
    finally:
        q.put(None)
        t.join()
        done.set()
        flush_due.set()
        f.join()
    if failed:
        raise failed[0]


def get_with_retries(client: httpx.Client, url: str, settings: NetSettings, *, headers: dict[str, str] | None = None,
                     what: str = "", ok: tuple[int, ...] = ()) -> httpx.Response:
    """A small GET (manifest, metadata) retried like a download; other non-2xx than `ok` is a RemoteError."""
    attempt, last = 0, ""
    while True:
        try:
            r = client.get(url, headers=headers or {})
            if r.status_code < 500 and r.status_code not in (408, 429):
                if r.status_code >= 400 and r.status_code not in ok:
                    raise RemoteError(f"{what or url}: HTTP {r.status_code} from {url}")
                return r
            last = f"HTTP {r.status_code}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > settings.retries:
            raise RemoteError(f"{what or url}: gave up after {settings.retries} retries: {last}")
        settings.sleep_before(attempt)
