"""The shipped tiny model is exactly what scripts/build_tiny_model.py builds."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import gguf
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "build_tiny_model.py"
SHIPPED = REPO / "node" / "builtin_models" / "tiny-chat"


def _load_builder() -> ModuleType:
    """Import the build script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _digests(root: Path) -> dict[str, str]:
    """Map each file's path relative to root to its sha256."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    return _load_builder()


def _field_str(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return str(field.contents())


def _field_int(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return int(field.contents())


def test_rebuild_matches_shipped_files(builder: ModuleType, tmp_path: Path) -> None:
    builder.build(tmp_path)
    rebuilt = _digests(tmp_path)
    assert rebuilt == _digests(SHIPPED)
    assert "tiny-chat.gguf" in rebuilt and "hf/model.safetensors" in rebuilt


def test_shipped_model_is_small() -> None:
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024


def test_gguf_metadata_reads_back() -> None:
    reader = gguf.GGUFReader(SHIPPED / "tiny-chat.gguf")
    assert _field_str(reader, "general.architecture") == "llama"
    assert _field_str(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field_str(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field_int(reader, "llama.context_length") == 2048
    template = _field_str(reader, "tokenizer.chat_template")
    assert "<|im_start|>" in template and "add_generation_prompt" in template

    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert tokens is not None
    eos = _field_int(reader, "tokenizer.ggml.eos_token_id")
    assert tokens.contents(eos) == "<|im_end|>"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "blk.1.attn_q.weight"}


def test_hf_config_matches_gguf() -> None:
    config = json.loads((SHIPPED / "hf" / "config.json").read_text())
    reader = gguf.GGUFReader(SHIPPED / "tiny-chat.gguf")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert tokens is not None
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == len(tokens.data)
    assert config["hidden_size"] == _field_int(reader, "llama.embedding_length")
    assert config["eos_token_id"] == _field_int(reader, "tokenizer.ggml.eos_token_id")
    tokenizer_config = json.loads((SHIPPED / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == _field_str(reader, "tokenizer.chat_template")


def test_unsampleable_tokens_cover_partial_utf8(builder: ModuleType) -> None:
    vocab = builder.train_tokenizer()
    banned = set(builder.unsampleable_ids(vocab))
    for idx, text in enumerate(vocab.tokens):
        if text in builder.SPECIAL_TOKENS:
            continue
        try:
            builder.token_bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            assert idx in banned, text
    assert vocab.special_ids[builder.EOS] not in banned
