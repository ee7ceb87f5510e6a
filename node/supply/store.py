"""The content-addressed model store under `data_dir/store`.

    blobs/sha256/<hex>            verified bytes, read-only, named by their digest
    partial/<hex>                 a blob being written (hashed as it is written)
    models/<name>/<digest12>/     a per-model view: the locked file tree, links to blobs

A blob becomes visible only by an atomic rename after its digest matched, so a crash,
a dropped connection or a full disk never leaves a half blob where a reader looks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from node.errors import StoreError
from node.supply.lockfile import SHA256_RE, LockedFile, LockEntry
from runtimes import ModelLayout

CHUNK = 1024 * 1024
HASH_WINDOW = 16 * 1024 * 1024  # mapped at a time by hash_through: what hashing adds to RSS, per file



def drain_pipe(pipe_r: int, n: int, append: Callable[[bytes], object]) -> None:
    """Read exactly `n` bytes a splice left in a pipe, passing them to `append` (EIO if it runs dry)."""
    while n:
        data = os.read(pipe_r, n)
        if not data:
            raise OSError(errno.EIO, "the pipe ran dry")
        append(data)
        n -= len(data)

class DigestMismatch(StoreError):
    def __init__(self, name: str, expected: str, actual: str, size: int | None = None) -> None:
        self.expected, self.actual = expected, actual
        extra = f" ({size} bytes)" if size is not None else ""
        super().__init__(f"{name}: digest mismatch: expected sha256:{expected}, got sha256:{actual}{extra}; the bad copy was deleted")


class SizeMismatch(StoreError):
    pass


class DiskFull(StoreError):
    pass


def check_hex(hexd: str) -> str:
    """Only `<64 lowercase hex>` names a blob; anything else is refused (no path tricks)."""
    if not SHA256_RE.match(hexd):
        raise StoreError(f"not a sha256 digest: {hexd!r}")
    return hexd


class BlobWriter:
    """Writes one blob: appends to its partial file, hashes what is in it, then commits.

    Bytes reach the file either hashed as they go (`write`, for local copies) or unhashed
    (`append`, `splice_in`, for downloads), in which case `hash_through` hashes them from
    the page cache on another thread, so receiving never waits on SHA-256. Holds an
    exclusive lock on the partial file, so two pulls of the same blob never write it at
    once; the second waits and then finds the blob present.
    """

    def __init__(self, store: Store, locked: LockedFile) -> None:
        self.store, self.locked = store, locked
        self.hexd = check_hex(locked.sha256)
        self.path = store.partial_dir / self.hexd
        self._hash = hashlib.sha256()
        self._fd = -1
        # Held while a window is mapped for hashing: a truncate then would SIGBUS the reader.
        self._map_lock = threading.Lock()
        self.offset = 0  # bytes in the partial file
        self.hashed = 0  # of which the hash has seen this many
        self._no_splice = self._no_mmap = False
        # True when the blob was already in the store once we held the lock.
        self.present = False

    @property
    def fd(self) -> int:
        assert self._fd >= 0, "BlobWriter used outside its with-block"
        return self._fd

    def __enter__(self) -> BlobWriter:
        self.store.partial_dir.mkdir(parents=True, exist_ok=True)
        while True:
            # No O_APPEND: splice(2) refuses append-mode files; writes go by explicit offset.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder before us may have renamed this partial into place (or deleted
            # it) while we waited: our lock is then on a file no one else will open.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        if self.store.has(self.locked):
            # Finished by a concurrent pull: leave our (empty) partial nowhere.
            self.present = True
            if os.fstat(fd).st_size == 0:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            return self
        # Resume: the bytes already on disk are appended to (and hashed by hash_through).
        size = os.fstat(fd).st_size
        if size > self.locked.size:
            os.ftruncate(fd, 0)
            size = 0
        self.offset, self.hashed = size, 0
        return self

    def _full(self) -> DiskFull:
        self._discard()
        return DiskFull(f"{self.locked.path}: disk full in {self.store.root}; free space and pull again")

    def _check_room(self, n: int) -> None:
        if self.offset + n > self.locked.size:
            self._discard()
            raise SizeMismatch(f"{self.locked.path}: more bytes than the {self.locked.size} locked; the source changed")

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Append without hashing (a hasher thread calls `hash_through`); short writes retried."""
        self._check_room(len(data))
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, self.offset)
                view = view[n:]
                self.offset += n
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._full() from None
            raise

    def splice_in(self, pipe_r: int, n: int) -> None:
        """Move `n` bytes from a pipe into the file in the kernel (no copy through Python)."""
        self._check_room(n)
        try:
            while n and not self._no_splice:
                moved = os.splice(pipe_r, self.fd, n, offset_dst=self.offset)
                if not moved:
                    raise OSError(errno.EIO, "splice moved no bytes")
                n -= moved
                self.offset += moved
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._full() from None
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            self._no_splice = True  # a filesystem that cannot take splice: copy through memory instead
        drain_pipe(pipe_r, n, self.append)

    def write(self, data: bytes | bytearray) -> None:
        """Append and hash at once (local copies, where nothing else runs alongside)."""
        self.hash_through(self.offset)
        self.append(data)
        self._hash.update(data)
        self.hashed = self.offset

    def hash_through(self, end: int) -> None:
        """Hash the file's bytes up to `end` from the page cache (mapped, not copied)."""
        while True:
            with self._map_lock:
                end = min(end, self.offset)  # a discard meanwhile leaves nothing to hash
                if self.hashed >= end:
                    return
                start = self.hashed - self.hashed % mmap.ALLOCATIONGRANULARITY
                stop = min(end, start + HASH_WINDOW)
                if not self._no_mmap:
                    try:
                        with mmap.mmap(self.fd, stop - start, prot=mmap.PROT_READ, offset=start) as m, memoryview(m) as v:
                            self._hash.update(v[self.hashed - start:])  # releases the GIL on big buffers
                        self.hashed = stop
                        continue
                    except (OSError, ValueError):
                        self._no_mmap = True  # a filesystem without mmap: read instead
                data = os.pread(self.fd, min(stop - self.hashed, CHUNK * 8), self.hashed)
                if not data:
                    raise OSError(errno.EIO, f"{self.path}: shorter than the {self.offset} bytes written")
                self._hash.update(data)
                self.hashed += len(data)

    def sync(self) -> None:
        """Start writing back what is written so far (a later commit's fsync is then short)."""
        with contextlib.suppress(OSError):  # closed or failing: commit reports it
            if self._fd >= 0:
                os.fdatasync(self._fd)

    def commit(self) -> Path:
        """Check size and digest, then rename into place; a mismatch deletes the partial."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._full() from None
            raise
        if self.present:
            return self.store.blob_path(self.hexd)
        if self.offset != self.locked.size:
            raise SizeMismatch(f"{self.locked.path}: got {self.offset} bytes, locked size is {self.locked.size}")
        self.hash_through(self.offset)
        actual = self._hash.hexdigest()
        if actual != self.hexd:
            self._discard()
            raise DigestMismatch(self.locked.path, self.hexd, actual, self.offset)
        final = self.store.blob_path(self.hexd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o444)
        os.replace(self.path, final)
        return final

    def reset(self) -> None:
        """Throw away what was written (the server ignored a Range request)."""
        with self._map_lock:
            os.ftruncate(self.fd, 0)
            self._hash, self.offset, self.hashed = hashlib.sha256(), 0, 0

    def discard(self) -> None:
        """Delete the partial file: its bytes can never become the locked blob."""
        self._discard()

    def _discard(self) -> None:
        with self._map_lock:
            self._hash, self.offset, self.hashed = hashlib.sha256(), 0, 0
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            if self._fd >= 0:
                os.ftruncate(self._fd, 0)

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


class Store:
    """The content-addressed store rooted at `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.partial_dir = root / "partial"
        self.models_dir = root / "models"

    def blob_path(self, hexd: str) -> Path:
        return self.blob_dir / check_hex(hexd)

    def has(self, locked: LockedFile) -> bool:
        """Present with the locked size (bytes were verified when written)."""
        try:
            return self.blob_path(locked.sha256).stat().st_size == locked.size
        except FileNotFoundError:
            return False

    def missing(self, entry: LockEntry) -> list[LockedFile]:
        seen: set[str] = set()
        out = []
        for f in entry.files:
            if f.sha256 not in seen and not self.has(f):
                out.append(f)
            seen.add(f.sha256)
        return out

    def writer(self, locked: LockedFile) -> BlobWriter:
        return BlobWriter(self, locked)

    def rehash(self, locked: LockedFile) -> Problem | None:
        """Re-read one blob and compare with the lock; None when it is good."""
        path = self.blob_path(locked.sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return Problem(locked.path, "missing from the store; run `infernode pull`")
        if size != locked.size:
            return Problem(locked.path, f"size {size}, locked {locked.size}; run `infernode pull` to fetch it again")
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != locked.sha256:
            return Problem(locked.path, f"digest mismatch: expected sha256:{locked.sha256}, got sha256:{h.hexdigest()}")
        return None

    def quarantine(self, locked: LockedFile) -> None:
        """Move a corrupt blob out of the way so the next pull fetches it again."""
        path = self.blob_path(locked.sha256)
        bad = self.root / "quarantine"
        bad.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, bad / locked.sha256)

    def verify(self, entry: LockEntry, *, rehash: bool = True) -> list[Problem]:
        """What is wrong with one model's bytes in the store (empty when all is well)."""
        problems: list[Problem] = []
        for f in entry.files:
            if rehash:
                p = self.rehash(f)
            else:
                p = None if self.has(f) else Problem(f.path, "missing from the store; run `infernode pull`")
            if p:
                problems.append(p)
        return problems

    def view(self, entry: LockEntry) -> Path:
        """The model's file tree (links to blobs), built on first use."""
        digest = entry.digest.removeprefix("sha256:")[:12] or "unsealed"
        root = self.models_dir / entry.name / digest
        if not root.resolve().is_relative_to(self.models_dir.resolve()):   # names are checked at load; never trust
            raise StoreError(f"model name {entry.name!r} would leave {self.models_dir}")
        if root.is_dir():
            return root
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for f in entry.files:
            target = tmp / f.path
            if not target.resolve().is_relative_to(tmp.resolve()):
                raise StoreError(f"{entry.name}: file path {f.path!r} escapes the model folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(self.blob_path(f.sha256))
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, root)
        except OSError:  # built concurrently by someone else
            shutil.rmtree(tmp, ignore_errors=True)
        return root

    def model_path(self, entry: LockEntry, layout: ModelLayout | None) -> Path:
        """What a runtime is pointed at (its adapter's layout): a GGUF file, an HF folder, or the Ollama tree."""
        root = self.view(entry)
        if layout is ModelLayout.GGUF_FILE:
            ggufs = sorted(f.path for f in entry.files if f.path.endswith(".gguf"))
            if not ggufs:
                raise StoreError(f"{entry.name}: no .gguf file among the locked files; select one with #GLOB in the source")
            return root / ggufs[0]
        if layout is ModelLayout.OLLAMA_TREE:
            return self.ollama_root(entry)
        configs = sorted((f.path for f in entry.files if f.path.rsplit("/", 1)[-1] == "config.json"), key=lambda p: p.count("/"))
        return (root / configs[0]).parent if configs else root

    def ollama_root(self, entry: LockEntry) -> Path:
        """The OLLAMA_MODELS tree shared by ollama: models, with this model linked in.

        An ollama: lock entry's paths already are that layout (`manifests/<host>/<ns>/
        <name>/<tag>` and `blobs/sha256-<hex>`), so each is a hard link to its store blob
        (a symlink across filesystems); `ollama serve` then needs no network.
        """
        root = self.root / "ollama"
        for f in entry.files:
            if not f.path.startswith(("manifests/", "blobs/sha256-")):
                raise StoreError(f"{entry.name}: {f.path!r} is not part of an Ollama model; is the source ollama:?")
            target = root / f.path
            if not target.resolve().is_relative_to(root.resolve()):
                raise StoreError(f"{entry.name}: file path {f.path!r} escapes the Ollama tree")
            blob = self.blob_path(f.sha256)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samefile(target, blob):
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            try:
                os.link(blob, tmp)
            except OSError:
                tmp.symlink_to(blob)
            os.replace(tmp, target)  # a re-locked tag swaps its manifest atomically
        return root

    def check_space(self, needed: int) -> None:
        """Refuse to start a pull that cannot fit (what partial files hold counts as had)."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if needed > free:
            raise DiskFull(f"{self.root}: needs {needed / 1e6:.1f} MB free for this pull, "
                           f"{free / 1e6:.1f} MB available; free space and pull again")

    def partial_size(self, locked: LockedFile) -> int:
        """Bytes already downloaded for a blob (resumed, not fetched again)."""
        try:
            return (self.partial_dir / check_hex(locked.sha256)).stat().st_size
        except FileNotFoundError:
            return 0

    def blobs(self) -> Iterator[Path]:
        if self.blob_dir.is_dir():
            yield from self.blob_dir.iterdir()
