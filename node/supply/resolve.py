"""`infernode lock`: resolve each model source to an immutable revision and file digests."""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

from node.config import Config, ModelConfig
from node.supply.lockfile import LockedFile, LockEntry, LockFile
from node.supply.sources import BuiltinSource, FileSource, OllamaSource, Source, SourceError, parse_source, registry_host
from node.supply.store import CHUNK


def hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _local_files(root: Path, glob: str | None) -> list[tuple[str, Path]]:
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise SourceError(f"{root} does not exist")
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(root).as_posix()
            if glob is None or fnmatch.fnmatch(rel, glob):
                out.append((rel, p))
    if not out:
        raise SourceError(f"{root}: no files" + (f" match '{glob}'" if glob else ""))
    return out


def resolve_local(model: ModelConfig, src: FileSource | BuiltinSource) -> LockEntry:
    files = []
    for rel, p in _local_files(src.path, src.glob):
        size, digest = hash_file(p)
        files.append(LockedFile(path=rel, size=size, sha256=digest))
    tree = hashlib.sha256("".join(f"{f.path}\0{f.sha256}\n" for f in files).encode()).hexdigest()
    return LockEntry(name=model.name, source=model.source, revision=f"sha256:{tree}", files=files).sealed()


def source_of(model: ModelConfig, config: Config) -> Source:
    return parse_source(model.source, base_dir=config.base_dir, registry=model.registry)


def resolve_model(model: ModelConfig, config: Config) -> LockEntry:
    """One model's lock entry (network access for hf:, ollama: and https: sources)."""
    src = source_of(model, config)
    if isinstance(src, (FileSource, BuiltinSource)):
        return resolve_local(model, src)
    from node.supply import remote  # network resolvers live apart from local ones
    return remote.resolve(model, src)


def build_lock(config: Config) -> LockFile:
    """The lock for every launched model (a server the node only routes to pins nothing)."""
    return LockFile(models=[resolve_model(m, config) for m in config.models if m.launched])


def stale_models(config: Config, lock: LockFile) -> dict[str, str]:
    """Models whose lock entry is missing or whose source changed, with the reason."""
    out = {}
    for m in config.models:
        if not m.launched:
            continue
        entry = lock.entry(m.name)
        if entry is None:
            out[m.name] = "not in models.lock; run `infernode lock`"
        elif entry.source != m.source:
            out[m.name] = f"source is '{m.source}' in appliance.toml but '{entry.source}' in models.lock; run `infernode lock`"
        elif isinstance(src := source_of(m, config), OllamaSource) and entry.files and not entry.files[0].path.startswith(
                f"manifests/{registry_host(src.registry)}/"):
            out[m.name] = f"registry is '{src.registry}' in appliance.toml but models.lock was resolved elsewhere; run `infernode lock`"
    return out
