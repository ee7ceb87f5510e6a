"""Ollama (Docker v2 / OCI) image manifests, checked and rebuilt from a lock entry alone.

An ollama: lock entry lists the manifest first, then the config blob, then each layer,
in manifest order, each with its media type: enough to check a stored manifest offline.
"""

from __future__ import annotations

import json

from node.errors import StoreError
from node.supply.lockfile import LockedFile, LockEntry

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def rebuild_manifest(entry: LockEntry) -> bytes:
    """The manifest as Ollama writes it (compact JSON), from the lock alone."""
    man, config, *layers = entry.files

    def item(f: LockedFile) -> dict:
        return {"mediaType": f.media_type, "digest": f"sha256:{f.sha256}", "size": f.size}

    doc = {"schemaVersion": 2, "mediaType": man.media_type or MANIFEST_V2,
           "config": item(config), "layers": [item(f) for f in layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


def check_manifest(entry: LockEntry, raw: bytes) -> None:
    """The stored manifest names exactly the blobs the lock pins, in order (offline check)."""
    try:
        doc = json.loads(raw)
        named = [(str(b["digest"]).removeprefix("sha256:"), int(b["size"]), b.get("mediaType"))
                 for b in [doc["config"], *doc["layers"]]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{entry.name}: {entry.files[0].path}: not a v2 image manifest ({exc})") from None
    pinned = [(f.sha256, f.size, f.media_type) for f in entry.files[1:]]
    if named != pinned:
        raise StoreError(f"{entry.name}: manifest {entry.revision} names other blobs than models.lock pins; run `infernode lock`")


def is_ollama_entry(entry: LockEntry) -> bool:
    return bool(entry.files) and entry.files[0].path.startswith("manifests/")
