"""Model cards from locked files (node/supply/modelcard.py): the built-in model, and files that lie."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from node.supply.lockfile import LockedFile, LockEntry
from node.supply.modelcard import ModelCard, card, gguf_metadata

TINY = Path(__file__).resolve().parents[1] / "node" / "builtin_models" / "tiny-chat"


def _entry(files: dict[str, Path], **media: str) -> tuple[LockEntry, dict[str, Path]]:
    by_sha = {}
    locked = []
    for name, path in files.items():
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        by_sha[sha] = path
        locked.append(LockedFile(path=name, size=path.stat().st_size, sha256=sha, media_type=media.get(name)))
    entry = LockEntry(name="m", source="file:x", revision="r", files=locked)
    entry = entry.model_copy(update={"digest": "sha256:" + entry.compute_digest().removeprefix("sha256:")})
    return entry, by_sha


def test_builtin_gguf():
    entry, by_sha = _entry({"tiny-chat.gguf": TINY / "tiny-chat.gguf"})
    c = card(entry, by_sha.__getitem__)
    assert c.size == (TINY / "tiny-chat.gguf").stat().st_size
    assert c.digest == entry.digest.removeprefix("sha256:") and len(c.digest) == 64
    assert c.family == "llama" and c.quantization == "F16" and not c.embedding
    assert not c.tools   # its ChatML template renders no tool definitions


def test_builtin_hf_snapshot():
    files = {p.name: p for p in (TINY / "hf").iterdir()}
    entry, by_sha = _entry(files)
    c = card(entry, by_sha.__getitem__)
    assert c.family == "llama" and not c.embedding and c.size == sum(p.stat().st_size for p in files.values())


def _gguf(path: Path, kvs: list[tuple[str, int, bytes]], count: int | None = None) -> Path:
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs) if count is None else count)
    for key, kind, value in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
    path.write_bytes(out)
    return path


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_embedding_model_and_tool_template(tmp_path):
    emb = _gguf(tmp_path / "e.gguf", [("general.architecture", 8, _s("bert")), ("bert.pooling_type", 4, b"\1\0\0\0")])
    entry, by_sha = _entry({"e.gguf": emb})
    assert card(entry, by_sha.__getitem__).embedding
    template = "{% if tools %}{{ tools | tojson }}{% endif %}"
    chat = _gguf(tmp_path / "c.gguf", [("general.architecture", 8, _s("qwen2")),
                                      ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _s("a") + _s("b")),
                                      ("tokenizer.chat_template", 8, _s(template)), ("general.file_type", 4,
                                                                                      struct.pack("<I", 15))])
    entry, by_sha = _entry({"c.gguf": chat})
    c = card(entry, by_sha.__getitem__)
    assert (c.family, c.tools, c.embedding, c.quantization) == ("qwen2", True, False, "Q4_K_M")


def test_hf_embedding_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                   "template": "{{ tools }}"}]}))
    entry, by_sha = _entry({"config.json": tmp_path / "config.json",
                            "tokenizer_config.json": tmp_path / "tokenizer_config.json"})
    c = card(entry, by_sha.__getitem__)
    assert c.embedding and c.family == "bert" and c.tools


@pytest.mark.parametrize("kvs, count", [
    ([("general.architecture", 8, struct.pack("<Q", 1 << 60))], None),        # a string longer than any file
    ([("x", 9, struct.pack("<IQ", 8, 1 << 40))], None),                       # an array of 2^40 strings
    ([("x", 9, struct.pack("<IQ", 10, 1 << 60))], None),                      # 2^60 u64s
    ([("x", 77, b"")], None),                                                 # an unknown type
    ([], 1 << 62),                                                            # more keys than the file holds
])
def test_malformed_headers_give_what_could_be_read(tmp_path, kvs, count):
    path = _gguf(tmp_path / "bad.gguf", kvs, count)
    assert gguf_metadata(path) == {}
    entry, by_sha = _entry({"bad.gguf": path})
    assert card(entry, by_sha.__getitem__) == ModelCard(size=path.stat().st_size,
                                                        digest=entry.digest.removeprefix("sha256:"))


def test_missing_blobs_and_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    entry, by_sha = _entry({"x.gguf": tmp_path / "x.gguf"})
    assert card(entry, lambda sha: tmp_path / "gone").family == ""
    assert card(entry, by_sha.__getitem__).family == ""
