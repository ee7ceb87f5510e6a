"""What a pinned model is, read from its locked files: size, digest, family, kind and tool use.

Ollama's listings (`/api/tags`, `/api/show`) describe models by these facts. They come
from the lock (sizes, the entry's digest) and from the model's own metadata in the
store: a GGUF file's header (`general.architecture`, `general.size_label`,
`general.file_type`, `<arch>.pooling_type`, `tokenizer.chat_template`), or an HF
snapshot's `config.json` and `tokenizer_config.json`. Read once per model, off the
event loop, with every read bounded; a file that is missing or malformed gives what
could be read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from node.supply.lockfile import LockEntry

MAX_METADATA_BYTES = 64 << 20   # GGUF metadata (vocabularies included) is a few MB; stop well past it
MAX_JSON_BYTES = 4 << 20
# GGUF value types (ggml's gguf.h) with a fixed size, by type number.
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
STRING, ARRAY = 8, 9
# llama_ftype names (llama.h) as Ollama shows them in `quantization_level`.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}
ENCODERS = ("bert", "nomic-bert", "jina-bert-v2", "t5encoder", "xlm-roberta", "modernbert")
GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class ModelCard:
    """A model's facts as listings show them ('' or 0 where unknown)."""

    size: int = 0
    digest: str = ""          # 64 hex digits: the lock entry's digest
    family: str = ""
    parameter_size: str = ""
    quantization: str = ""
    embedding: bool = False   # makes embeddings rather than text
    tools: bool = False       # its chat template renders tool definitions


class _Malformed(Exception):
    pass


class _Reader:
    """Bounded little-endian reads from a GGUF header."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.used = f, 0

    def take(self, n: int) -> bytes:
        self.used += n
        if self.used > MAX_METADATA_BYTES:
            raise _Malformed("metadata too large")
        data = self.f.read(n)
        if len(data) != n:
            raise _Malformed("truncated")
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip(self, kind: int) -> None:
        if kind in FIXED:
            self.take(FIXED[kind])
        elif kind == STRING:
            size = self.u64()
            self.used += size  # strings of a vocabulary: skipped unread, counted toward the bound
            if self.used > MAX_METADATA_BYTES:
                raise _Malformed("metadata too large")
            self.f.seek(size, 1)
        elif kind == ARRAY:
            inner, count = self.u32(), self.u64()
            if inner in FIXED:
                size = FIXED[inner] * count
                self.used += size
                if self.used > MAX_METADATA_BYTES:
                    raise _Malformed("metadata too large")
                self.f.seek(size, 1)
            else:
                for _ in range(count):
                    self.skip(inner)
        else:
            raise _Malformed(f"unknown value type {kind}")


def gguf_metadata(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """The GGUF header's scalar and string values (of the `wanted` keys, or those ending in a wanted suffix)."""
    out: dict[str, Any] = {}
    try:
        with path.open("rb") as f:
            r = _Reader(f)
            if r.take(4) != b"GGUF":
                return out
            version = r.u32()
            if version < 2:
                return out
            r.u64()  # tensor count
            for _ in range(min(r.u64(), 100_000)):
                key = r.string().decode("utf-8", "replace")
                kind = r.u32()
                keep = wanted is None or key in wanted or any(key.endswith(w) for w in wanted if w.startswith("."))
                if keep and kind in INTS:
                    out[key] = struct.unpack(INTS[kind], r.take(FIXED[kind]))[0]
                elif keep and kind == STRING:
                    out[key] = r.string().decode("utf-8", "replace")
                else:
                    r.skip(kind)
    except (OSError, _Malformed, struct.error):
        pass
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = json.loads(f.read(MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


GGUF_KEYS = {"general.architecture", "general.size_label", "general.file_type", "tokenizer.chat_template",
             ".pooling_type"}


def card(entry: LockEntry, blob: Any) -> ModelCard:
    """The card of a locked model; `blob(sha256) -> Path` finds a locked file's bytes in the store."""
    size = sum(f.size for f in entry.files)
    digest = entry.digest.removeprefix("sha256:")
    by_name = {f.path.rsplit("/", 1)[-1]: f for f in entry.files}
    gguf = next((f for f in sorted(entry.files, key=lambda f: f.path)
                 if f.path.endswith(".gguf") or f.media_type == "application/vnd.ollama.image.model"), None)
    if gguf is not None:
        meta = gguf_metadata(blob(gguf.sha256), GGUF_KEYS)
        arch = str(meta.get("general.architecture", ""))
        template = str(meta.get("tokenizer.chat_template", ""))
        template_layer = next((f for f in entry.files if f.media_type == "application/vnd.ollama.image.template"), None)
        if template_layer is not None:  # Ollama's Go template: tools when it ranges over .Tools
            try:
                template += blob(template_layer.sha256).read_bytes()[:MAX_JSON_BYTES].decode("utf-8", "replace")
            except OSError:
                pass
        pooled = any(k.endswith(".pooling_type") for k in meta)
        return ModelCard(size, digest, arch, str(meta.get("general.size_label", "")),
                         FILE_TYPES.get(meta.get("general.file_type", -1), ""),
                         embedding=pooled or arch in ENCODERS, tools="tools" in template.lower())
    config = _json(blob(by_name["config.json"].sha256)) if "config.json" in by_name else {}
    tokenizer = _json(blob(by_name["tokenizer_config.json"].sha256)) if "tokenizer_config.json" in by_name else {}
    heads = config.get("architectures") or []
    generative = any(isinstance(h, str) and h.endswith(GENERATIVE_HEADS) for h in heads)
    raw = tokenizer.get("chat_template")
    if isinstance(raw, list):  # named templates: [{"name", "template"}]
        raw = " ".join(str(t.get("template", "")) for t in raw if isinstance(t, dict))
    template = raw if isinstance(raw, str) else ""
    return ModelCard(size, digest, str(config.get("model_type", "")), quantization=str(config.get("torch_dtype", "")),
                     embedding="modules.json" in by_name or bool(heads) and not generative,
                     tools="tools" in template)
