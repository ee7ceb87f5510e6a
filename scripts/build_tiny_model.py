"""Build the tiny random-weight Llama chat model shipped in node/builtin_models/tiny-chat.

The model exists so that tests, demos and `infernode doctor` can run a real runtime
(llama.cpp from the GGUF, vLLM from the HF folder) on a box with no model hub access.
It knows nothing: weights are random, output is word-piece noise. Everything is derived
from constants in this file, so a rebuild is byte-identical and network-free:

    python scripts/build_tiny_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "node" / "builtin_models" / "tiny-chat"
MODEL_NAME = "tiny-chat"
GGUF_NAME = "tiny-chat.gguf"
HF_DIR = "hf"

SEED = 20261123
VOCAB_SIZE = 512
HIDDEN = 128
LAYERS = 2
HEADS = 2
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 256
CONTEXT = 2048
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
INIT_STD = 0.02

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END]
EOS = IM_END

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Residual-stream channel that carries the same value at every position (see _weights).
BIAS_CHANNEL = HIDDEN - 1
BIAS_VALUE = 0.02
# Logit offsets, in units of the bias channel's value after the final norm (about 1):
# masked tokens sit far below any reachable logit; eos sits just low enough that a
# completion almost always runs until max_tokens, yet can still end by itself.
MASK_LOGIT = -60.0
EOS_LOGIT = -8.0

# Training text for the tokenizer; plain ASCII so every learned merge is valid UTF-8.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you doing today?",
    "I am a small language model that runs on your own machine.",
    "Please summarize the following paragraph in two sentences.",
    "The weather is sunny with a light breeze from the west.",
    "What is the capital of France? The capital of France is Paris.",
    "She opened the window and listened to the rain on the roof.",
    "Our team shipped the new release on Tuesday morning.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Can you write a short poem about the ocean and the stars?",
    "The library closes at nine o'clock in the evening.",
    "He counted the apples: one, two, three, four, and five.",
    "A good test is small, fast, and tells you exactly what broke.",
    "The server answered the request in less than a second.",
    "Thank you very much for your help with this problem.",
    "Mountains rise above the valley where the river runs.",
    "Translate this sentence into simple English, please.",
    "The cat slept in the warm sun near the kitchen door.",
    "Every morning they walk to the market to buy fresh bread.",
    "Numbers like 42, 100 and 2048 appear in many examples.",
    "Sorry, I do not know the answer to that question.",
    "The machine learning model predicts the next word in a sentence.",
    "Keep your answers short, clear, and friendly.",
    "The children played football in the park after school.",
    "Reading books is a wonderful way to learn new ideas.",
    "The train to the city leaves from platform seven at noon.",
    "Good evening, everyone, and welcome to the show.",
    "Yesterday it snowed, but today the roads are clear.",
    "Computers store information as long strings of bits.",
    "Let me think about it step by step before I answer.",
    "The garden is full of red roses and yellow tulips.",
    "Why is the sky blue? Sunlight scatters in the air.",
]


@dataclass(frozen=True)
class Vocab:
    """Token strings in id order (GPT-2 byte-level form), merges and special ids."""

    tokens: list[str]
    merges: list[str]
    special_ids: dict[str, int]
    tokenizer_json: str


def _byte_to_unicode() -> dict[int, str]:
    """Map each byte to the printable character byte-level BPE stands it in for."""
    # Printable Latin-1 bytes keep their own code point; the rest are shifted past 255
    # in byte order. This is the convention both `tokenizers` and llama.cpp decode.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def token_bytes(token: str) -> bytes:
    """Return the raw bytes a byte-level BPE token string stands for."""
    inverse = {ch: b for b, ch in _byte_to_unicode().items()}
    return bytes(inverse[ch] for ch in token)


def train_tokenizer() -> Vocab:
    """Train the byte-level BPE tokenizer on SENTENCES."""
    tokenizer = Tokenizer(models.BPE())
    # GPT-2 regex split: llama.cpp's `gpt-2` pre-tokenizer splits the same way.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 bytes, so any UTF-8 input can be encoded, not only the training text.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)

    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    if "" in tokens:
        raise RuntimeError("tokenizer ids are not contiguous")
    tokenizer_json = tokenizer.to_str(pretty=True)
    raw_merges = json.loads(tokenizer_json)["model"]["merges"]
    # Newer `tokenizers` store a merge as a pair, older ones as "a b"; GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    special_ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    return Vocab(tokens=tokens, merges=merges, special_ids=special_ids, tokenizer_json=tokenizer_json + "\n")


def unsampleable_ids(vocab: Vocab) -> list[int]:
    """Ids the model must never sample: partial UTF-8, control bytes, bos and im_start."""
    banned: list[int] = [vocab.special_ids[BOS], vocab.special_ids[IM_START]]
    for idx, text in enumerate(vocab.tokens):
        if text in SPECIAL_TOKENS:
            continue
        raw = token_bytes(text)
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama-cpp-python holds back an incomplete UTF-8 tail and re-detokenizes
            # the whole completion on each step while it waits: streaming turns
            # quadratic. A random model would sample such bytes constantly.
            banned.append(idx)
            continue
        # Keep output printable: raw control characters confuse terminals and logs.
        if any(ord(ch) < 0x20 and ch not in "\n\t" or ord(ch) == 0x7F for ch in decoded):
            banned.append(idx)
    return sorted(banned)


def _f16_exact(array: np.ndarray) -> np.ndarray:
    """Round to float16 and back, so the f32 HF copy equals the f16 GGUF copy."""
    return array.astype(np.float16).astype(np.float32)


def _weights(vocab: Vocab) -> dict[str, np.ndarray]:
    """Draw the HF-layout weights (float32 holding float16-exact values)."""
    # RandomState, not Generator: its stream is frozen across numpy releases.
    rng = np.random.RandomState(SEED)
    n_vocab = len(vocab.tokens)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, INIT_STD, size=shape).astype(np.float32)

    c = BIAS_CHANNEL
    embed = normal(n_vocab, HIDDEN)
    # Every token embeds the same value on channel c, and no layer reads or writes c,
    # so after the final norm c holds a positive, nearly constant value: a bias
    # input for lm_head, which Llama otherwise lacks.
    embed[:, c] = BIAS_VALUE
    weights: dict[str, np.ndarray] = {"model.embed_tokens.weight": embed}

    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        projections = {
            "self_attn.q_proj": normal(HEADS * HEAD_DIM, HIDDEN),
            "self_attn.k_proj": normal(KV_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.v_proj": normal(KV_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.o_proj": normal(HIDDEN, HEADS * HEAD_DIM),
            "mlp.gate_proj": normal(FFN, HIDDEN),
            "mlp.up_proj": normal(FFN, HIDDEN),
            "mlp.down_proj": normal(HIDDEN, FFN),
        }
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            projections[name][:, c] = 0.0
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            projections[name][c, :] = 0.0
        for name, value in projections.items():
            weights[f"{prefix}.{name}.weight"] = value
        weights[f"{prefix}.input_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)
        weights[f"{prefix}.post_attention_layernorm.weight"] = np.ones(HIDDEN, dtype=np.float32)

    weights["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    lm_head = normal(n_vocab, HIDDEN)
    lm_head[:, c] = 0.0
    lm_head[unsampleable_ids(vocab), c] = MASK_LOGIT
    lm_head[vocab.special_ids[EOS], c] = EOS_LOGIT
    weights["lm_head.weight"] = lm_head
    return {name: _f16_exact(value) for name, value in weights.items()}


def _permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's half-split rotary layout to llama.cpp's interleaved one."""
    rows, cols = weight.shape
    half = rows // n_head // 2
    # HF rotates (x[i], x[i + half]) within a head; llama.cpp rotates (x[2i], x[2i + 1]).
    return weight.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_tensors(weights: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield GGUF tensor names and arrays: f16 matrices, f32 norms, permuted q/k."""
    yield "token_embd.weight", weights["model.embed_tokens.weight"].astype(np.float16)
    for layer in range(LAYERS):
        hf = f"model.layers.{layer}"
        blk = f"blk.{layer}"
        yield f"{blk}.attn_norm.weight", weights[f"{hf}.input_layernorm.weight"]
        yield f"{blk}.attn_q.weight", _permute_qk(weights[f"{hf}.self_attn.q_proj.weight"], HEADS).astype(np.float16)
        yield f"{blk}.attn_k.weight", _permute_qk(weights[f"{hf}.self_attn.k_proj.weight"], KV_HEADS).astype(np.float16)
        yield f"{blk}.attn_v.weight", weights[f"{hf}.self_attn.v_proj.weight"].astype(np.float16)
        yield f"{blk}.attn_output.weight", weights[f"{hf}.self_attn.o_proj.weight"].astype(np.float16)
        yield f"{blk}.ffn_norm.weight", weights[f"{hf}.post_attention_layernorm.weight"]
        yield f"{blk}.ffn_gate.weight", weights[f"{hf}.mlp.gate_proj.weight"].astype(np.float16)
        yield f"{blk}.ffn_up.weight", weights[f"{hf}.mlp.up_proj.weight"].astype(np.float16)
        yield f"{blk}.ffn_down.weight", weights[f"{hf}.mlp.down_proj.weight"].astype(np.float16)
    yield "output_norm.weight", weights["model.norm.weight"]
    yield "output.weight", weights["lm_head.weight"].astype(np.float16)


def write_gguf(path: Path, vocab: Vocab, weights: dict[str, np.ndarray]) -> None:
    """Write the llama.cpp GGUF file."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(MODEL_NAME)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in vocab.tokens]
    )
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.special_ids[BOS])
    writer.add_eos_token_id(vocab.special_ids[EOS])
    writer.add_pad_token_id(vocab.special_ids[BOS])
    # ChatML needs no bos; adding one would make llama.cpp and vLLM prompts differ.
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for name, array in _gguf_tensors(weights):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_json(path: Path, data: object) -> None:
    """Write JSON with a stable layout."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf(folder: Path, vocab: Vocab, weights: dict[str, np.ndarray]) -> None:
    """Write the Hugging Face folder (config, safetensors, tokenizer files) for vLLM."""
    folder.mkdir(parents=True, exist_ok=True)
    bos_id = vocab.special_ids[BOS]
    eos_id = vocab.special_ids[EOS]
    _write_json(
        folder / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": len(vocab.tokens),
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": CONTEXT,
            "rms_norm_eps": RMS_EPS,
            "rope_theta": ROPE_THETA,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": INIT_STD,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": bos_id,
            "torch_dtype": "float32",
        },
    )
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": bos_id},
    )
    # transformers refuses safetensors files whose metadata lacks a known format.
    save_file(dict(sorted(weights.items())), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(vocab.tokenizer_json, encoding="utf-8")
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(vocab.special_ids[t]): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t in SPECIAL_TOKENS
            },
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": BOS,
            "unk_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": CONTEXT,
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"additional_special_tokens": [IM_START, IM_END], "bos_token": BOS, "eos_token": EOS, "pad_token": BOS},
    )


def build(out: Path) -> list[Path]:
    """Build the GGUF file and the HF folder under `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer()
    weights = _weights(vocab)
    write_gguf(out / GGUF_NAME, vocab, weights)
    write_hf(out / HF_DIR, vocab, weights)
    return sorted(p for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for path in build(args.out):
        print(f"{path.stat().st_size:>9}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
