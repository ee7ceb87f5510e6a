"""`infernode pull`: bring what `models.lock` pins into the store, verified by digest.

Sources, in order: the store itself (nothing to do), `--from` (a folder or a bundle,
for air-gapped boxes), else the model's own source (local files, or the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.config import Config, ModelConfig
from node.supply.bundle import import_entry
from node.supply.ingest import copy_in
from node.supply.lockfile import LockEntry
from node.supply.manifest import check_manifest, is_ollama_entry
from node.supply.progress import NullProgress, PullProgress
from node.supply.resolve import source_of
from node.supply.sources import BuiltinSource, FileSource
from node.supply.store import Store


@dataclass(frozen=True)
class PullResult:
    model: str
    fetched: int
    present: int


def pull_entry(store: Store, entry: LockEntry, model: ModelConfig, config: Config,
               progress: PullProgress | None = None, from_: Path | None = None) -> PullResult:
    """Fetch every missing file of one model; raise StoreError on any mismatch."""
    progress = progress or NullProgress()
    missing = store.missing(entry)
    if missing:
        if from_ is not None:
            import_entry(store, entry, from_, progress)
        else:
            src = source_of(model, config)
            if isinstance(src, (FileSource, BuiltinSource)):
                store.check_space(sum(f.size for f in missing))
                root = src.path
                for f in missing:
                    copy_in(store, root if root.is_file() else root / f.path, f, entry.name, progress)
            else:
                from node.supply import remote  # network code is loaded only for network sources
                remote.pull(store, entry, src, progress=progress)
    finish_views(store, entry)
    return PullResult(entry.name, len(missing), len(entry.files) - len(missing))


def finish_views(store: Store, entry: LockEntry) -> None:
    """Build the model's views now, so a runtime never waits on them (and Ollama finds its tree)."""
    store.view(entry)
    if is_ollama_entry(entry):
        check_manifest(entry, store.blob_path(entry.files[0].sha256).read_bytes())
        store.ollama_root(entry)
