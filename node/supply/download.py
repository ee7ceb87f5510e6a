"""One HTTP download into a store blob: Range resume, retries with backoff, stall timeout.

The bytes go straight into a `BlobWriter`'s partial file (spliced from the socket when
the connection is plain TCP); another thread hashes them from the page cache as they
land, so receiving never waits on SHA-256 and a download needs no second read pass. Anything short of a verified blob
leaves at most a partial file under `store/partial/`, which the next attempt (or the
next `infernode pull`, after a kill) resumes with `Range: bytes=<have>-`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import random
import re
import select
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from node.errors import StoreError
from node.supply.bulkhttp import BulkClient, BulkResponse, ProxyRefused
from node.supply.lockfile import LockedFile
from node.supply.proxies import ProxyConfigError
from node.supply.store import BlobWriter, SizeMismatch

CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
READ_SIZE = 4 * 1024 * 1024  # per TLS read: big, so per-call overhead is small
PIPE_SIZE = 1024 * 1024  # per splice: the default /proc/sys/fs/pipe-max-size
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
POLL_SLICE_S = 0.25
HASH_BATCH = 8 * 1024 * 1024  # the hasher waits for this much before mapping it
SYNC_EVERY = 64 * 1024 * 1024


HF_HINT = " (gated or private repo? set HF_TOKEN or run `hf auth login`)"
PROXY_HINT = "; the proxy wants credentials: put them in the proxy URL, HTTPS_PROXY=http://USER:PASSWORD@HOST:PORT"


class RemoteError(StoreError):
    """A source that cannot be reached or refuses us (after retries where retrying helps)."""


class SettingsError(StoreError):
    """A pull setting in the environment that cannot be used."""


class PullCancelled(StoreError):
    """The pull was interrupted (Ctrl-C, shutdown); what arrived is kept for a resume."""


class Flag(Protocol):
    """What stops a download when set: an Event, or anything else that answers is_set()."""

    def is_set(self) -> bool: ...


class Sink(Protocol):
    """Where a body's bytes go: a blob's partial file, or one byte range of it."""

    locked: LockedFile

    @property
    def offset(self) -> int: ...
    def append(self, data: bytes | bytearray | memoryview) -> None: ...
    def splice_in(self, pipe_r: int, n: int) -> None: ...


class Retry(Exception):
    """A failure worth another attempt (5xx, 429, a reset, a stall, a short body)."""


@dataclass(frozen=True)
class NetSettings:
    """How hard to try: connections at once (all files of a pull), attempts, backoff, stall timeout.

    `min_segment` is the smallest byte range a file is split into; a file no bigger
    than it (or a server without Range) is fetched over one connection.
    """

    parallel: int = 8
    retries: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 15.0
    stall_timeout_s: float = 30.0
    connect_timeout_s: float = 15.0
    min_segment: int = 16 * 1024 * 1024

    @classmethod
    def from_env(cls, parallel: int | None = None) -> NetSettings:
        """Defaults (`parallel` from `[node] pull_concurrency` when set), overridden by
        INFERNODE_PULL_{CONCURRENCY,RETRIES,BACKOFF_S,STALL_S,SEGMENT_MIB}."""
        return cls(
            parallel=_env_number("INFERNODE_PULL_CONCURRENCY", int, parallel or cls.parallel, 1, 64),
            min_segment=_env_number("INFERNODE_PULL_SEGMENT_MIB", int, cls.min_segment >> 20, 1, 4096) << 20,
            retries=_env_number("INFERNODE_PULL_RETRIES", int, cls.retries, 0, 1000),
            backoff_s=_env_number("INFERNODE_PULL_BACKOFF_S", float, cls.backoff_s, 0.0, 3600.0),
            stall_timeout_s=_env_number("INFERNODE_PULL_STALL_S", float, cls.stall_timeout_s, 0.1, 86400.0),
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


def _env_number(name: str, kind: type[int | float], default: float, low: float, high: float) -> Any:
    """A number from the environment, or a SettingsError naming the variable and what it takes."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{name}={raw!r}: must be {what} from {low:g} to {high:g} (default {default:g})")
    return value


def fetch_into(client: BulkClient, url: str, writer: BlobWriter, settings: NetSettings, *,
               headers: dict[str, str] | None = None, on_bytes: Callable[[int], None] | None = None,
               cancel: Flag | None = None) -> None:
    """Fill `writer` from `url` up to the locked size, resuming and retrying as needed."""
    retrying(writer.locked.path, url, settings, cancel, lambda: writer.offset, writer.locked.size,
             lambda: _one_attempt(client, url, writer, settings, headers or {}, on_bytes, cancel))


def retrying(path: str, url: str, settings: NetSettings, cancel: Flag | None,
             position: Callable[[], int], end: int, attempt_once: Callable[[], None]) -> None:
    """Call `attempt_once` until `position()` reaches `end`: transient failures are retried
    with backoff (the count restarts whenever bytes arrived), the others raised as they are."""
    attempt, last = 0, ""
    while position() < end:
        if cancel is not None and cancel.is_set():
            raise PullCancelled(f"{path}: interrupted at byte {position()}; pull again to resume")
        before = position()
        try:
            attempt_once()
        except ProxyRefused as exc:
            raise RemoteError(f"{path}: {exc}{PROXY_HINT if ' 407 ' in str(exc) else ''}") from None
        except ProxyConfigError as exc:
            raise RemoteError(str(exc)) from None
        except ssl.SSLCertVerificationError as exc:  # no retry will make the certificate trusted
            raise RemoteError(f"{path}: {url}: {exc.verify_message or exc}; for a private CA, "
                              "point SSL_CERT_FILE at a bundle that includes it") from None
        except Retry as exc:
            last = str(exc)
        except (OSError, http.client.HTTPException) as exc:  # reset, refused, stall (timeout), TLS, short body
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if position() >= end:
            return
        if position() > before:
            attempt = 0  # progress was made: a flaky link is not a dead one
        attempt += 1
        if attempt > settings.retries:
            raise RemoteError(f"{path}: {url}: gave up after {settings.retries} retries "
                              f"at byte {position()} of {end}: {last}")
        settings.sleep_before(attempt)


def _one_attempt(client: BulkClient, url: str, writer: BlobWriter, settings: NetSettings, headers: dict[str, str],
                 on_bytes: Callable[[int], None] | None, cancel: Flag | None) -> None:
    size, path = writer.locked.size, writer.locked.path
    h = dict(headers)
    if writer.offset:
        h["range"] = f"bytes={writer.offset}-"
    with client.get(url, h) as r:
        code = r.status
        if code == 416 and writer.offset:
            _restart(writer, on_bytes)  # our partial is longer than what the server has: start over
            raise Retry("HTTP 416 for our resume offset")
        if code >= 500 or code in (408, 429):
            raise Retry(f"HTTP {code}")
        if code == 206:
            m = CONTENT_RANGE.match(r.header("content-range") or "")
            if not m or int(m.group(1)) != writer.offset:
                _restart(writer, on_bytes)
                raise Retry(f"bad Content-Range {r.header('content-range')!r}")
            if m.group(3) != "*" and int(m.group(3)) != size:
                writer.discard()
                raise SizeMismatch(f"{path}: the server has {m.group(3)} bytes, models.lock pins {size}; the source changed")
        elif code == 200:
            take_whole(r, writer, settings, on_bytes, cancel)
            return _check_complete(writer)
        else:
            raise refused(path, url, code)
        pump(r, writer, on_bytes, cancel, settings.stall_timeout_s)
    _check_complete(writer)


def _check_complete(writer: BlobWriter) -> None:
    if writer.offset < writer.locked.size:
        raise Retry(f"connection closed at byte {writer.offset} of {writer.locked.size}")


def refused(path: str, url: str, code: int) -> RemoteError:
    """The error for an answer no retry changes (4xx), with a hint where one helps."""
    hint = {401: HF_HINT, 403: HF_HINT, 407: PROXY_HINT}.get(code, "")
    return RemoteError(f"{path}: {url}: HTTP {code}{hint}")


def take_whole(r: BulkResponse, writer: BlobWriter, settings: NetSettings,
               on_bytes: Callable[[int], None] | None, cancel: Flag | None) -> None:
    """Receive a 200 answer: the whole body from byte 0 (what a server that ignores Range sends)."""
    if writer.offset:
        _restart(writer, on_bytes)  # our partial bytes are thrown away: the body starts at byte 0
    size, length = writer.locked.size, r.header("content-length")
    if length is not None and int(length) != size:
        writer.discard()
        raise SizeMismatch(f"{writer.locked.path}: the server has {length} bytes, models.lock pins {size}; the source changed")
    pump(r, writer, on_bytes, cancel, settings.stall_timeout_s)


def _restart(writer: BlobWriter, on_bytes: Callable[[int], None] | None) -> None:
    """Throw away the partial bytes (and take them back from the progress count)."""
    had = writer.offset
    writer.reset()
    if on_bytes and had:
        on_bytes(-had)


def pump(r: BulkResponse, writer: BlobWriter, on_bytes: Callable[[int], None] | None,
          cancel: Flag | None, stall_s: float) -> None:
    """Receive into the partial file on this thread while another hashes what has landed there.

    A plain-TCP body is spliced from the socket into the file in the kernel; a TLS body
    is read into a large buffer and written. A third thread writes back to disk as bytes
    arrive, so the fsync before the rename finds little left. Every byte that arrived
    before a failure stays in the file, so the next attempt resumes right after it.
    """
    failed: list[BaseException] = []
    landed, flush_due, done = threading.Event(), threading.Event(), threading.Event()

    def hasher() -> None:
        try:
            while not done.is_set():
                landed.wait()
                landed.clear()
                if writer.offset - writer.hashed >= HASH_BATCH:  # fewer, larger maps
                    writer.hash_through(writer.offset)
            writer.hash_through(writer.offset)
        except BaseException as exc:  # handed to the receiving thread below
            failed.append(exc)

    def flusher() -> None:
        while True:
            flush_due.wait()
            flush_due.clear()
            if done.is_set():
                return
            writer.sync()

    unsynced = 0

    def arrived(n: int) -> None:
        nonlocal unsynced
        landed.set()
        if on_bytes:
            on_bytes(n)
        unsynced += n
        if unsynced >= SYNC_EVERY:
            unsynced = 0
            flush_due.set()

    threads = [threading.Thread(target=hasher, name="pull-hash", daemon=True),
               threading.Thread(target=flusher, name="pull-sync", daemon=True)]
    for t in threads:
        t.start()
    try:
        raw = r.raw_body()
        if raw is not None:
            splice_body(*raw, writer, arrived, failed, cancel, stall_s)
        else:
            read_body(r, writer, arrived, failed, cancel)
    finally:
        done.set()
        landed.set()
        flush_due.set()
        for t in threads:
            t.join()
    if failed:
        raise failed[0]


def _cancelled(writer: Sink, cancel: Flag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise PullCancelled(f"{writer.locked.path}: interrupted at byte {writer.offset}; pull again to resume")


def splice_body(sock: int, pre: bytes, remaining: int, writer: Sink, arrived: Callable[[int], None],
                 failed: list[BaseException], cancel: Flag | None, stall_s: float) -> None:
    """socket -> pipe -> file with splice(2): the bytes never pass through Python."""
    if pre:
        writer.append(pre)
        arrived(len(pre))
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a bigger pipe moves more per call; the default works too
            fcntl.fcntl(pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        idle = 0.0
        while remaining > 0 and not failed:
            _cancelled(writer, cancel)
            try:
                n = os.splice(sock, pipe_w, min(PIPE_SIZE, remaining))
            except BlockingIOError:  # the socket has a timeout, so it is non-blocking: wait here
                if poll.poll(int(POLL_SLICE_S * 1000)):
                    continue
                idle += POLL_SLICE_S  # short slices, so Ctrl-C is not kept waiting by a stall
                if idle >= stall_s:
                    raise TimeoutError(f"no byte for {stall_s:g} s") from None
                continue
            idle = 0.0
            if not n:
                return  # the peer closed early: the caller resumes from here
            writer.splice_in(pipe_r, n)
            remaining -= n
            arrived(n)
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def read_body(r: BulkResponse, writer: Sink, arrived: Callable[[int], None],
               failed: list[BaseException], cancel: Flag | None) -> None:
    """TLS (or unsized) bodies: decrypt into one large buffer, write it, repeat."""
    buf = bytearray(READ_SIZE)
    with memoryview(buf) as view:
        while not failed:
            _cancelled(writer, cancel)
            n = r.readinto(view)
            if not n:
                return
            writer.append(view[:n])
            arrived(n)


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


def hash_with_retries(client: httpx.Client, url: str, settings: NetSettings, *,
                      headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Size and sha256 of the bytes at `url` as they come over the wire (never decoded: a server that
    gzips anyway cannot inflate them in memory), streamed in bounded memory, retried like a download."""
    attempt, last = 0, ""
    while True:
        try:
            with client.stream("GET", url, headers=headers or {}) as r:
                if r.status_code < 500 and r.status_code not in (408, 429):
                    if r.status_code >= 400:
                        raise RemoteError(f"{url}: HTTP {r.status_code} from {url}")
                    h, size = hashlib.sha256(), 0
                    for chunk in r.iter_raw(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
                    return size, h.hexdigest()
                last = f"HTTP {r.status_code}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > settings.retries:
            raise RemoteError(f"{url}: gave up after {settings.retries} retries: {last}")
        settings.sleep_before(attempt)
