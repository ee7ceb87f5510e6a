"""Air-gapped bundles: one tar with `models.lock` and the blobs it pins.

    models.lock            the lock entries the bundle carries
    blobs/sha256/<hex>     each blob once, named by its digest

The tar is uncompressed (weights do not compress) so import can seek to each blob.
Nothing in a bundle is trusted: every blob is hashed while it is written into the
store, against the importing box's own `models.lock`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from node.errors import StoreError
from node.supply.ingest import copy_in, copy_stream
from node.supply.lockfile import LockedFile, LockEntry, LockFile, write_lock
from node.supply.progress import PullProgress
from node.supply.store import DigestMismatch, Store

LOCK_MEMBER = "models.lock"


@dataclass(frozen=True)
class BundleSummary:
    path: Path
    models: int
    blobs: int
    bytes: int


class _HashingReader:
    """Reads a blob for tarfile while hashing it: verified on export with no second pass."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data


def export_bundle(store: Store, lock: LockFile, out: Path) -> BundleSummary:
    """Write `out` (atomically) with the lock and every blob it pins, checking each digest."""
    blobs: dict[str, LockedFile] = {}
    for entry in lock.models:
        for f in entry.files:
            blobs.setdefault(f.sha256, f)
    absent = [f"{e.name}/{f.path}" for e in lock.models for f in e.files if not store.has(f)]
    if absent:
        raise StoreError(f"not in the store: {', '.join(absent[:5])}; run `infernode pull` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            with tempfile.TemporaryDirectory() as d:
                write_lock(Path(d) / LOCK_MEMBER, lock)
                tar.add(Path(d) / LOCK_MEMBER, arcname=LOCK_MEMBER)
            for hexd, f in blobs.items():
                info = tarfile.TarInfo(f"blobs/sha256/{hexd}")
                info.size, info.mode = f.size, 0o444
                with store.blob_path(hexd).open("rb") as src:
                    reader = _HashingReader(src)
                    tar.addfile(info, reader)
                if reader.hash.hexdigest() != hexd:
                    raise DigestMismatch(f.path, hexd, reader.hash.hexdigest())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return BundleSummary(out, len(lock.models), len(blobs), sum(f.size for f in blobs.values()))


def read_bundle_lock(path: Path) -> LockFile:
    """The lock a bundle carries (for messages: what it was exported for)."""
    with tarfile.open(path, "r:") as tar:
        if LOCK_MEMBER not in tar.getnames():
            raise StoreError(f"{path}: not an infernode bundle (no {LOCK_MEMBER})")
        return LockFile.model_validate(tomllib.loads(_member(tar, LOCK_MEMBER).read().decode()))


def import_entry(store: Store, entry: LockEntry, source: Path, progress: PullProgress) -> None:
    """Import one model's missing blobs from a bundle file or a folder, verifying each."""
    if source.is_dir():
        _import_from_dir(store, entry, source, progress)
    elif source.is_file():
        _import_from_bundle(store, entry, source, progress)
    else:
        raise StoreError(f"{source}: no such bundle or folder")


def _candidates(root: Path, entry: LockEntry, f: LockedFile) -> list[Path]:
    # An extracted bundle or a copied store; an OLLAMA_MODELS tree; a model folder.
    return [root / "blobs" / "sha256" / f.sha256, root / "blobs" / f"sha256-{f.sha256}",
            root / entry.name / f.path, root / f.path]


def _import_from_dir(store: Store, entry: LockEntry, root: Path, progress: PullProgress) -> None:
    missing = store.missing(entry)
    store.check_space(sum(f.size for f in missing))
    for f in missing:
        path = next((p for p in _candidates(root, entry, f) if p.is_file() and p.stat().st_size == f.size), None)
        if path is None:
            raise StoreError(f"{entry.name}: {f.path} (sha256:{f.sha256}) is not in {root}")
        copy_in(store, path, f, entry.name, progress)


def _import_from_bundle(store: Store, entry: LockEntry, path: Path, progress: PullProgress) -> None:
    missing = store.missing(entry)
    store.check_space(sum(f.size for f in missing))
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        raise StoreError(f"{path}: not an uncompressed tar bundle ({exc})") from None
    with tar:
        names = set(tar.getnames())
        if LOCK_MEMBER not in names:
            raise StoreError(f"{path}: not an infernode bundle (no {LOCK_MEMBER})")
        for f in missing:
            member = f"blobs/sha256/{f.sha256}"
            if member not in names:
                theirs = _bundle_entry(tar, entry.name)
                why = f"it pins {theirs.revision}, models.lock pins {entry.revision}" if theirs else "the model is not in it"
                raise StoreError(f"{entry.name}: {f.path} (sha256:{f.sha256}) is not in {path}: {why}")
            _member(tar, member)   # a link is refused before anything is written
            copy_stream(store, f, entry.name, progress, functools.partial(_member, tar, member))


def _member(tar: tarfile.TarFile, name: str) -> BinaryIO:
    """A regular member's bytes; a link (symbolic or hard) or anything else is refused, never followed."""
    try:
        info = tar.getmember(name)
    except KeyError:
        raise StoreError(f"{tar.name!s}: no {name} in the bundle") from None
    src = tar.extractfile(info) if info.isfile() else None
    if src is None:
        kind = "a symbolic link" if info.issym() else "a hard link" if info.islnk() else "not a regular file"
        raise StoreError(f"{tar.name!s}: {name} is {kind} in the bundle; a bundle holds regular files only "
                         "(write it with `infernode bundle export`)")
    return src  # type: ignore[return-value]


def _bundle_entry(tar: tarfile.TarFile, name: str) -> LockEntry | None:
    member = _member(tar, LOCK_MEMBER)
    lock = LockFile.model_validate(tomllib.loads(io.TextIOWrapper(member).read()))
    return lock.entry(name)
