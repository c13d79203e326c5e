from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from omx.errors import InvalidRequest
from omx.storage import human_number, is_gguf, read_gguf_info
from tests.support.storage_gguf import TOKENS, write_gguf


def test_info_from_a_written_gguf(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", chat_template="{% for m in messages %}{{ m }}{% endfor %}")
    info = read_gguf_info(path)
    assert info.architecture == "llama"
    assert info.parameter_count == 8 * 16 + 16 + 16 * 4
    assert info.file_type == 15 and info.quantization_level == "Q4_K_M"
    assert (info.context_length, info.embedding_length, info.block_count) == (4096, 16, 2)
    assert (info.head_count, info.head_count_kv) == (4, 2)
    assert info.chat_template == "{% for m in messages %}{{ m }}{% endfor %}"
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    assert info.pooling_type is None and not info.is_embedding
    mi = info.model_info
    assert mi["general.architecture"] == "llama"
    assert mi["general.parameter_count"] == 208
    assert mi["llama.context_length"] == 4096
    assert mi["llama.attention.layer_norm_rms_epsilon"] == 1e-06
    assert mi["tokenizer.ggml.tokens"] is None and mi["tokenizer.ggml.scores"] is None
    assert "tokenizer.chat_template" not in mi
    assert not any(k.startswith("GGUF.") for k in mi)


def test_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", arch="qwen2", file_type=int(gguf.LlamaFileType.MOSTLY_F16))
    info = read_gguf_info(path, verbose=True)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = info.model_info[key]
        if isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-6)
        else:
            assert got == expected, key
    assert info.model_info["tokenizer.ggml.tokens"] == TOKENS
    assert info.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    assert info.quantization_level == "F16"


def test_embedding_model_and_f32(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "e.gguf", arch="bert", pooling=1, file_type=0)
    info = read_gguf_info(path)
    assert info.pooling_type == "mean" and info.is_embedding
    assert info.quantization_level == "F32"


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"PK\x03\x04 not a gguf file at all")
    assert not is_gguf(p)
    with pytest.raises(InvalidRequest, match="not a valid GGUF"):
        read_gguf_info(p)
    t = tmp_path / "trunc.gguf"
    t.write_bytes(write_gguf(tmp_path / "ok.gguf").read_bytes()[:200])
    with pytest.raises(InvalidRequest, match="not a valid GGUF"):
        read_gguf_info(t)


@pytest.mark.parametrize(
    ("n", "text"),
    [(268_098_176, "268.10M"), (8_030_261_248, "8.0B"), (7_000_000_000, "7B"), (1_000_000, "1M"),
     (25_000, "25K"), (999, "999")],
)
def test_human_number(n: int, text: str) -> None:
    assert human_number(n) == text
