"""`infernode pull`: bring what `models.lock` pins into the store, verified by digest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from node.config import Config, ModelConfig
from node.lockfile import LockEntry
from node.resolve import source_of
from node.sources import BuiltinSource, FileSource
from node.store import Store

Progress = Callable[[str, int, int], None]  # (file path, bytes done, bytes total)


@dataclass(frozen=True)
class PullResult:
    model: str
    fetched: int
    present: int


def pull_entry(store: Store, entry: LockEntry, model: ModelConfig, config: Config,
               progress: Progress | None = None) -> PullResult:
    """Fetch every missing file of one model; raise StoreError on any mismatch."""
    missing = store.missing(entry)
    src = source_of(model, config)
    if missing:
        if isinstance(src, (FileSource, BuiltinSource)):
            root = src.path
            for f in missing:
                path = root if root.is_file() else root / f.path
                store.import_file(path, f)
                if progress:
                    progress(f.path, f.size, f.size)
        else:
            from node import remote
            remote.pull(store, entry, src, progress=progress)
    store.view(entry)
    return PullResult(entry.name, len(missing), len(entry.files) - len(missing))
