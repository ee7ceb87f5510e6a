"""`infernode pull`: bring what `models.lock` pins into the store, verified by digest.

Sources, in order: the store itself (nothing to do), `--from` (a folder or a bundle,
for air-gapped boxes), else the model's own source (local files, or the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from node.config import Config, ModelConfig
from node.errors import StoreError
from node.supply.lockfile import LockedFile, LockEntry
from node.supply.manifest import check_manifest, is_ollama_entry
from node.supply.progress import NullProgress, PullProgress
from node.supply.resolve import source_of
from node.supply.sources import BuiltinSource, FileSource
from node.supply.store import CHUNK, Store


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
            from node.supply.bundle import import_entry
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


def finish_views(store: Store, entry: LockEntry) -> None:
    """Build the model's views now, so a runtime never waits on them (and Ollama finds its tree)."""
    store.view(entry)
    if is_ollama_entry(entry):
        check_manifest(entry, store.blob_path(entry.files[0].sha256).read_bytes())
        store.ollama_root(entry)
