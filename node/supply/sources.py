"""Model sources as written in `appliance.toml`, parsed into typed values.

    hf:ORG/REPO[@REVISION][#GLOB]      Hugging Face Hub (or $HF_ENDPOINT mirror)
    ollama:NAME[:TAG]                  an Ollama registry (registry.ollama.ai unless `registry`)
    https://...#sha256=<hex>           one file by URL, pinned by its digest
    file:PATH[#GLOB]                   a local file or folder, hashed at lock
    builtin:NAME[#GLOB]                a model shipped inside infernode (tiny-chat)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
BUILTIN_DIR = Path(__file__).parent.parent / "builtin_models"


class SourceError(ValueError):
    """A source string that cannot be parsed; the message says what to write instead."""


@dataclass(frozen=True)
class HfSource:
    repo: str
    revision: str = "main"
    glob: str | None = None


@dataclass(frozen=True)
class OllamaSource:
    name: str
    tag: str = "latest"
    registry: str = "registry.ollama.ai"

    @property
    def repository(self) -> str:
        """The registry path: library/NAME for bare names, as Ollama does."""
        return self.name if "/" in self.name else f"library/{self.name}"


@dataclass(frozen=True)
class UrlSource:
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1].split("?", 1)[0] or "model"


@dataclass(frozen=True)
class FileSource:
    path: Path
    glob: str | None = None


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    glob: str | None = None

    @property
    def path(self) -> Path:
        return BUILTIN_DIR / self.name


def registry_host(registry: str) -> str:
    """The registry as Ollama names it in its manifests tree (no scheme)."""
    return registry.split("://", 1)[-1].rstrip("/")


Source = HfSource | OllamaSource | UrlSource | FileSource | BuiltinSource


def parse_source(text: str, *, base_dir: Path | None = None, registry: str | None = None) -> Source:
    """Parse a source string; relative file: paths resolve against base_dir."""
    scheme, sep, rest = text.partition(":")
    if not sep or not rest:
        raise SourceError(f"'{text}' has no scheme; write hf:ORG/REPO, ollama:NAME:TAG, https://...#sha256=HEX, file:PATH or builtin:NAME")
    if scheme == "hf":
        body, _, glob = rest.partition("#")
        repo, _, rev = body.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise SourceError(f"'{text}': the Hub repo must be ORG/REPO")
        return HfSource(repo=repo, revision=rev or "main", glob=glob or None)
    if scheme == "ollama":
        name, _, tag = rest.partition(":")
        if not name:
            raise SourceError(f"'{text}': write ollama:NAME[:TAG]")
        return OllamaSource(name=name, tag=tag or "latest", registry=registry or "registry.ollama.ai")
    if scheme in ("https", "http"):
        url, _, frag = text.partition("#")
        key, _, hexd = frag.partition("=")
        if key != "sha256" or not SHA256_HEX.match(hexd):
            raise SourceError(f"'{text}': pin URLs by digest: {url}#sha256=<64 hex>")
        return UrlSource(url=url, sha256=hexd)
    if scheme == "file":
        body, _, glob = rest.partition("#")
        p = Path(body).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = (base_dir / p).resolve()
        return FileSource(path=p, glob=glob or None)
    if scheme == "builtin":
        name, _, glob = rest.partition("#")
        if not (BUILTIN_DIR / name).is_dir():
            known = ", ".join(sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir())) if BUILTIN_DIR.is_dir() else ""
            raise SourceError(f"'{text}': no built-in model '{name}' (built-in: {known})")
        return BuiltinSource(name=name, glob=glob or None)
    raise SourceError(f"'{text}': unknown scheme '{scheme}'; use hf:, ollama:, https://, file: or builtin:")
