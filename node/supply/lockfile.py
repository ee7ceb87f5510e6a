"""`models.lock`: the pinned models, read and written as TOML.

One entry per model: name, source, immutable revision, one digest over the whole
entry, and the files with size and sha256. Only `infernode lock` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from node.config.models import MODEL_NAME, check_model_name
from node.errors import ConfigError

LOCK_VERSION = 1
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HEADER = "# Written by `infernode lock`. Review changes like any lock file; do not edit by hand.\n"


class LockedFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(min_length=1)]
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=SHA256_RE.pattern)]
    # Ollama layers keep their media type so the manifest can be rebuilt and checked.
    media_type: str | None = None


class LockEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # becomes a store folder's name: checked like appliance.toml's, so a hand-edited lock cannot leave the store
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=MODEL_NAME), AfterValidator(check_model_name)]
    source: str
    revision: str
    digest: str = ""
    files: list[LockedFile]

    def compute_digest(self) -> str:
        """sha256 over the canonical JSON of everything in the entry but the digest."""
        body = self.model_dump(exclude={"digest"}, exclude_none=True)
        body["files"] = sorted(body["files"], key=lambda f: f["path"])
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()

    def sealed(self) -> LockEntry:
        """This entry with its digest filled in."""
        return self.model_copy(update={"digest": self.compute_digest()})

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


class LockFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = LOCK_VERSION
    models: list[LockEntry] = []

    def entry(self, name: str) -> LockEntry | None:
        return next((m for m in self.models if m.name == name), None)


def read_lock(path: Path) -> LockFile:
    """Read and check `models.lock`; a missing file is an empty lock."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return LockFile()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML ({exc})", "run `infernode lock` to rewrite it") from None
    try:
        lock = LockFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(str(path), key, str(err["msg"]), "run `infernode lock` to rewrite it") from None
    if lock.version != LOCK_VERSION:
        raise ConfigError(str(path), "version", f"unsupported lock version {lock.version}", "upgrade infernode or rerun `infernode lock`")
    for i, entry in enumerate(lock.models):
        if entry.digest != entry.compute_digest():
            raise ConfigError(
                str(path), f"models[{i}].digest",
                f"digest of '{entry.name}' does not match its contents (edited by hand?)",
                "run `infernode lock` to rewrite it",
            )
    return lock


def write_lock(path: Path, lock: LockFile) -> None:
    """Write `models.lock` atomically, entries sealed and sorted by name."""
    lock = LockFile(version=LOCK_VERSION, models=sorted((e.sealed() for e in lock.models), key=lambda e: e.name))
    doc = lock.model_dump(exclude_none=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(HEADER + tomli_w.dumps(doc))
    os.replace(tmp, path)
