"""Tiny but real llama-architecture GGUF files for tests.

:func:`write_tiny_llama` writes a GGUF v3 file with random weights (fixed
seed) and a real SentencePiece-style tokenizer section, small enough that
llama-cpp-python and ctransformers load it in milliseconds and generate from
it deterministically.

The vocabulary is laid out like LLaMA's: ``<unk>``, ``<s>``, ``</s>``, the 256
byte tokens ``<0x00>``..``<0xFF>``, then single printable characters and every
prefix of ``▁word`` for a list of common words (SentencePiece merges pairs
only when the merged piece is in the vocabulary, so whole words are reachable
only through their prefixes). Every printable ASCII character is a piece, so an
ASCII text never produces more tokens than characters + 1 (older tokenizers,
ctransformers' among them, size their output buffer that way).

The output rows of special and byte tokens are zero, so their logits are
exactly 0 while the best word logit is positive: greedy decoding never ends on
its own and never emits raw bytes unless ``emit_bytes`` / ``eos_bias`` say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

__all__ = ["CHAT_TEMPLATE", "WORDS", "build_vocab", "write_tiny_llama"]

SPACE = "\u2581"

WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with",
    "as", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "hot", "word", "but",
    "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your",
    "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about",
    "many", "then", "them", "write", "would", "like", "so", "these", "her", "long", "make", "thing",
    "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound",
    "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down",
    "side", "been", "now", "find", "hello", "world", "model", "token", "cluster", "node", "llama", "sky",
    "blue", "why", "json", "true", "false", "null", "name", "age", "user", "assistant", "system",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A Zephyr-like template using the control tokens of the tiny vocabulary."""

_CHAT_CONTROL = ("<|system|>", "<|user|>", "<|assistant|>")


def build_vocab(words: tuple[str, ...] = WORDS) -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token types) of the tiny SentencePiece vocabulary."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [
        int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL),
    ]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(int(gguf.TokenType.BYTE))
    for piece in _CHAT_CONTROL:
        tokens.append(piece)
        types.append(int(gguf.TokenType.CONTROL))
    seen = set(tokens)
    pieces = [SPACE] + [chr(c) for c in range(33, 127)]
    for word in words:
        full = SPACE + word
        pieces.extend(full[:end] for end in range(2, len(full) + 1))
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(int(gguf.TokenType.NORMAL))
    # Like SentencePiece log-probabilities: earlier (more frequent) pieces merge first.
    scores = [0.0 if t != int(gguf.TokenType.NORMAL) else -float(i) for i, t in enumerate(types)]
    return tokens, scores, types


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int = 128,
    n_ctx: int = 256,
    dtype: str = "f32",
    chat_template: str | None = CHAT_TEMPLATE,
    pooling: str | None = None,
    emit_bytes: bool = False,
    eos_bias: float = 0.0,
    words: tuple[str, ...] = WORDS,
) -> Path:
    """Write a tiny llama GGUF to ``path`` and return it.

    ``dtype`` is ``"f32"`` or ``"f16"`` for the weight matrices. ``pooling``
    (``"mean"``, ``"cls"``, ``"last"``) declares a pooling type, which makes
    the model an embedding model for llama.cpp. ``emit_bytes`` lets greedy
    decoding pick byte tokens (multibyte UTF-8 output); ``eos_bias`` > 0 makes
    ``</s>`` likely so generations end with ``stop``.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    head_dim = n_embd // n_head
    tokens, scores, types = build_vocab(words)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    wtype = np.float32 if dtype == "f32" else np.float16

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(wtype)

    def norm() -> np.ndarray:
        # Norm weights stay F32: llama.cpp expects 1-D tensors in F32.
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("omx-tiny-llama")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16))
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd, 1.0))
    for layer in range(n_layer):
        prefix = f"blk.{layer}."
        scale = 1.0 / np.sqrt(n_embd)
        writer.add_tensor(prefix + "attn_norm.weight", norm())
        writer.add_tensor(prefix + "attn_q.weight", matrix(n_embd, n_embd, scale))
        writer.add_tensor(prefix + "attn_k.weight", matrix(n_head_kv * head_dim, n_embd, scale))
        writer.add_tensor(prefix + "attn_v.weight", matrix(n_head_kv * head_dim, n_embd, scale))
        writer.add_tensor(prefix + "attn_output.weight", matrix(n_embd, n_embd, scale))
        writer.add_tensor(prefix + "ffn_norm.weight", norm())
        writer.add_tensor(prefix + "ffn_gate.weight", matrix(n_ff, n_embd, scale))
        writer.add_tensor(prefix + "ffn_up.weight", matrix(n_ff, n_embd, scale))
        writer.add_tensor(prefix + "ffn_down.weight", matrix(n_embd, n_ff, 1.0 / np.sqrt(n_ff)))
    writer.add_tensor("output_norm.weight", norm())
    output = matrix(n_vocab, n_embd, 1.0).astype(np.float32)
    silent = [i for i, t in enumerate(types) if t in (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL))]
    if not emit_bytes:
        silent += [i for i, t in enumerate(types) if t == int(gguf.TokenType.BYTE)]
    output[silent] = 0.0
    if eos_bias:
        # The final norm keeps hidden states near unit scale, so a row along a
        # fixed direction with a large norm dominates for most positions.
        output[2] = eos_bias * np.sign(rng.standard_normal(n_embd))
    writer.add_tensor("output.weight", output.astype(wtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out
