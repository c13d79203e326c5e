"""omx's output is llama-cpp-python's output: same text, same token counts."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from tests.support.node import NodeProcess

pytestmark = pytest.mark.e2e

SAMPLING = {"temperature": 0.0, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1,
            "repeat_last_n": 64, "seed": 11}
LOAD = {"num_ctx": 256, "num_thread": 2, "num_batch": 64}


@pytest.fixture(scope="module")
def bare(tiny_gguf: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, n_threads=2, n_batch=64, seed=11,
                           last_n_tokens_size=64, verbose=False)


@pytest.mark.parametrize("prompt", ["hello world", "the cat sat on", "a b c d e f"])
def test_generate_equals_bare_llama_cpp(node: NodeProcess, bare: llama_cpp.Llama, prompt: str) -> None:
    expected = bare.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=40, top_p=0.9, min_p=0.0,
                                      repeat_penalty=1.1, seed=11)
    with node.client() as http:
        got = http.post("/api/generate", json={"model": "tiny", "prompt": prompt, "raw": True, "stream": False,
                                               "options": {**SAMPLING, **LOAD, "num_predict": 24}}).json()
    assert got["response"] == expected["choices"][0]["text"]
    assert got["eval_count"] == expected["usage"]["completion_tokens"]
    assert got["prompt_eval_count"] == expected["usage"]["prompt_tokens"]
    assert got["prompt_eval_count"] == len(bare.tokenize(prompt.encode()))


def test_stop_matches_bare_llama_cpp(node: NodeProcess, bare: llama_cpp.Llama) -> None:
    full = bare.create_completion("the cat", max_tokens=24, temperature=0.0, seed=11,
                                  repeat_penalty=1.1)["choices"][0]["text"]
    stop = full.split()[2] if len(full.split()) > 2 else full[-3:]
    expected = bare.create_completion("the cat", max_tokens=24, temperature=0.0, seed=11, repeat_penalty=1.1,
                                      stop=[stop])
    with node.client() as http:
        got = http.post("/api/generate", json={"model": "tiny", "prompt": "the cat", "raw": True, "stream": False,
                                               "options": {**SAMPLING, **LOAD, "num_predict": 24,
                                                           "stop": [stop]}}).json()
    assert got["response"] == expected["choices"][0]["text"]
    assert got["done_reason"] == "stop" == expected["choices"][0]["finish_reason"]


def test_embed_equals_bare_llama_cpp(node: NodeProcess, tiny_gguf: Path) -> None:
    # A model that declares no pooling is mean-pooled, as llama.cpp's embedding examples do.
    emb = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, n_threads=2, n_batch=256, n_ubatch=256,
                          embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    normalized = emb.embed("hello world", normalize=True)
    raw = emb.embed("hello world", normalize=False)
    with node.client() as http:
        got = http.post("/api/embed", json={"model": "tiny", "input": "hello world", "options": LOAD}).json()
        legacy = http.post("/api/embeddings", json={"model": "tiny", "prompt": "hello world",
                                                    "options": LOAD}).json()
    assert got["embeddings"][0] == pytest.approx(normalized, rel=1e-4, abs=1e-6)
    assert legacy["embedding"] == pytest.approx(raw, rel=1e-4, abs=1e-6)
