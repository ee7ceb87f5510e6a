"""`infernode pull`: bring what `models.lock` pins into the store, verified by digest.

Sources, in order: the store itself (nothing to do), `--from` (a folder or a bundle,
for air-gapped boxes), else the model's own source (local files, or the network). The
network files of every model in one pull are fetched together, under one connection
limit (node.supply.remote.pull_many).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.config import Config, ModelConfig
from node.errors import StoreError
from node.supply.bundle import import_entry
from node.supply.ingest import copy_in
from node.supply.lockfile import LockEntry
from node.supply.manifest import check_manifest, is_ollama_entry
from node.supply.progress import NullProgress, PullProgress
from node.supply.resolve import source_of
from node.supply.sources import BuiltinSource, FileSource, Source
from node.supply.store import Store


@dataclass(frozen=True)
class PullResult:
    model: str
    fetched: int
    present: int


def pull_entry(store: Store, entry: LockEntry, model: ModelConfig, config: Config,
               progress: PullProgress | None = None, from_: Path | None = None) -> PullResult:
    """Fetch every missing file of one model; raise StoreError on any mismatch."""
    result = pull_entries(store, [(entry, model)], config, progress, from_)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def pull_entries(store: Store, jobs: list[tuple[LockEntry, ModelConfig]], config: Config,
                 progress: PullProgress | None = None,
                 from_: Path | None = None) -> list[PullResult | BaseException]:
    """Fetch the missing files of every model, the network ones all at once; one result per model, in order.

    A model's failure is its result (the others still finish); a bad pull setting raises.
    """
    progress = progress or NullProgress()
    missing = {entry.name: store.missing(entry) for entry, _ in jobs}
    errors: dict[str, BaseException | None] = {}
    remote_jobs: list[tuple[LockEntry, Source]] = []
    for entry, model in jobs:
        if not missing[entry.name]:
            continue
        try:
            if from_ is not None:
                import_entry(store, entry, from_, progress)
                continue
            src = source_of(model, config)
            if isinstance(src, (FileSource, BuiltinSource)):
                store.check_space(sum(f.size for f in missing[entry.name]))
                root = src.path
                for f in missing[entry.name]:
                    copy_in(store, root if root.is_file() else root / f.path, f, entry.name, progress)
            else:
                remote_jobs.append((entry, src))
        except StoreError as exc:
            errors[entry.name] = exc
    if remote_jobs:
        from node.supply import remote  # network code is loaded only for network sources
        from node.supply.download import NetSettings

        settings = NetSettings.from_env(config.node.pull_concurrency)  # a bad value raises: nothing is pulled
        try:
            errors.update(remote.pull_many(store, remote_jobs, progress, settings))
        except StoreError as exc:  # before any file started (no room, no registry token): every model's
            errors.update((entry.name, exc) for entry, _ in remote_jobs)
    out: list[PullResult | BaseException] = []
    for entry, _ in jobs:
        err = errors.get(entry.name)
        if err is None:
            try:
                finish_views(store, entry)
            except StoreError as exc:
                err = exc
        n = len(missing[entry.name])
        out.append(err if err is not None else PullResult(entry.name, n, len(entry.files) - n))
    return out


def finish_views(store: Store, entry: LockEntry) -> None:
    """Build the model's views now, so a runtime never waits on them (and Ollama finds its tree)."""
    store.view(entry)
    if is_ollama_entry(entry):
        check_manifest(entry, store.blob_path(entry.files[0].sha256).read_bytes())
        store.ollama_root(entry)
