"""Small GGUF files with chosen metadata, for the storage tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

__all__ = ["TOKENS", "write_gguf"]

TOKENS = ["<unk>", "<s>", "</s>", *[f"tok{i}" for i in range(97)]]


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    file_type: int = int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
    chat_template: str | None = "{{ messages }}",
    pooling: int | None = None,
    general_type: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a GGUF with a few F32 tensors (8*16 + 16 + 16*4 = 208 parameters) and a 100-token vocab."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    if general_type:
        w.add_type(general_type)
    w.add_file_type(file_type)
    w.add_context_length(4096)
    w.add_embedding_length(16)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    if pooling is not None:
        w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * len(TOKENS))
    w.add_token_types([1] * len(TOKENS))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 16)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.add_tensor("output.weight", rng.standard_normal((16, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
