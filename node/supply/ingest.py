"""Local bytes into the store: a file or a stream (a bundle's member), hashed while written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from node.errors import StoreError
from node.supply.lockfile import LockedFile
from node.supply.progress import PullProgress
from node.supply.store import CHUNK, Store


def copy_in(store: Store, path: Path, f: LockedFile, model: str, progress: PullProgress) -> None:
    """Copy one local file into the store, hashing while copying, reporting progress."""
    if not path.is_file():
        raise StoreError(f"{model}: {f.path}: {path} is missing; restore it or run `infernode lock`")
    copy_stream(store, f, model, progress, lambda: path.open("rb"))


def copy_stream(store: Store, f: LockedFile, model: str, progress: PullProgress,
                open_src: Callable[[], BinaryIO]) -> None:
    """Write one blob from a local stream (file, bundle member) through a BlobWriter."""
    label = f"{model}/{f.path}"
    with store.writer(f) as w:
        progress.start(label, f.size, f.size if w.present else 0)
        try:
            if not w.present:
                w.reset()
                with open_src() as src:
                    while chunk := src.read(CHUNK):
                        w.write(chunk)
                        progress.advance(label, len(chunk))
                w.commit()
        except BaseException as exc:
            progress.finish(label, False, getattr(exc, "message", str(exc)))
            raise
        progress.finish(label, True)
