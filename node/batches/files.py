"""Stored files' bytes: data_dir/files/<id>, owner-only, written whole or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from node.batches.records import new_id


class FileStore:
    """A folder of files named by id (ids are made by the node, never by a client)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def path(self, file_id: str) -> Path:
        if not file_id or "/" in file_id or file_id.startswith("."):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def write(self, file_id: str, chunks: Iterable[bytes]) -> int:
        """Write a file whole (a temporary name, fsync, rename); return its size. Blocking."""
        self._ensure()
        final = self.path(file_id)
        tmp = self.root / f".{file_id}.{new_id('')}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return size

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def delete(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()

    def sweep_partials(self) -> int:
        """Remove what a crash left half written; return how many."""
        if not self.root.is_dir():
            return 0
        n = 0
        for p in self.root.glob(".*.partial"):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        return n
