"""Wire details clients depend on, on a real node: a ``null`` field or option
is an unset one, a stream has one NDJSON line per token, and ``/api/ps`` lists
a model once whatever options loaded it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from omx.runtime.engine._textstream import TextStream
from tests.support.node import NodeProcess, create_model
from tests.support.tiny_gguf import SPACE, build_vocab, write_tiny_llama

pytestmark = pytest.mark.e2e

OPTION_NAMES = (
    "num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n", "temperature",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "stop", "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only",
    "use_mmap", "use_mlock", "num_thread", "tfs_z",
)
NULL_OPTIONS: dict[str, Any] = dict.fromkeys(OPTION_NAMES)
"""Every option Ollama knows, unset, as LangChain sends them."""


@pytest.fixture(scope="module")
def http(node: NodeProcess) -> Iterator[httpx.Client]:
    with node.client() as client:
        yield client


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The NDJSON lines of a streamed reply, each parsed on its own."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


# ------------------------------------------------------------------ null is unset


def test_null_options_are_ignored_like_ollama(http: httpx.Client) -> None:
    plain = _post(http, "/api/generate", {"model": "tiny", "prompt": "the cat", "stream": False,
                                          "options": {"num_predict": 6}})
    nulls = _post(http, "/api/generate", {
        "model": "tiny", "prompt": "the cat", "stream": False,
        "options": {**NULL_OPTIONS, "num_predict": 6},
        "format": None, "keep_alive": None, "template": None, "system": None, "suffix": None, "images": None,
        "context": None, "raw": None, "think": None,
    })
    # The model's own PARAMETERs (temperature 0, seed 42) still apply: the same greedy text.
    assert nulls["response"] == plain["response"] and nulls["response"]
    assert nulls["eval_count"] == plain["eval_count"] == 6
    assert nulls["done_reason"] == "length"
    assert nulls["context"] == plain["context"]


def test_null_stream_means_the_default_stream(http: httpx.Client) -> None:
    lines = _stream(http, "/api/generate", {"model": "tiny", "prompt": "the cat", "stream": None,
                                            "options": {**NULL_OPTIONS, "num_predict": 3}})
    assert [line["done"] for line in lines] == [False, False, False, True]


def test_null_chat_fields_are_ignored(http: httpx.Client) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "the cat"}]
    plain = _post(http, "/api/chat", {"model": "tiny", "messages": messages, "stream": False,
                                      "options": {"num_predict": 5}})
    nulls = _post(http, "/api/chat", {
        "model": "tiny", "stream": False, "options": {**NULL_OPTIONS, "num_predict": 5},
        "messages": [{**m, "images": None, "tool_calls": None, "thinking": None, "tool_name": None}
                     for m in messages],
        "tools": None, "format": None, "keep_alive": None, "think": None,
    })
    assert nulls["message"] == plain["message"] and nulls["message"]["content"]
    assert nulls["eval_count"] == 5 and nulls["done_reason"] == "length"


def test_null_embed_fields_are_ignored(http: httpx.Client) -> None:
    plain = _post(http, "/api/embed", {"model": "tiny", "input": ["hello world"]})
    nulls = _post(http, "/api/embed", {"model": "tiny", "input": ["hello world"], "options": NULL_OPTIONS,
                                       "truncate": None, "dimensions": None, "keep_alive": None})
    assert nulls["embeddings"] == plain["embeddings"] and len(nulls["embeddings"][0]) == 64
    legacy = _post(http, "/api/embeddings", {"model": "tiny", "prompt": "hello world", "options": NULL_OPTIONS,
                                             "keep_alive": None})
    assert len(legacy["embedding"]) == 64
    loaded = _post(http, "/api/embed", {"model": "tiny", "input": None})
    assert loaded["embeddings"] == []


def test_null_show_fields_are_ignored(http: httpx.Client) -> None:
    shown = _post(http, "/api/show", {"model": "tiny", "system": None, "template": None, "options": None,
                                      "verbose": None})
    assert shown["details"]["family"] == "llama"


def test_a_wrong_non_null_option_is_still_refused(http: httpx.Client) -> None:
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                         "options": {**NULL_OPTIONS, "mirostat": "often"}})
    assert r.status_code == 400
    assert r.json() == {"error": "option 'mirostat' must be an integer, got \"often\""}


# ------------------------------------------------------------------ one line per token


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_streamed_generate_is_one_line_per_token(http: httpx.Client, tokens: int) -> None:
    lines = _stream(http, "/api/generate", {"model": "tiny", "prompt": "the cat", "options": {"num_predict": tokens}})
    *content, final = lines
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["eval_count"] == tokens
    assert len(content) == tokens
    assert all(line["done"] is False and line["response"] for line in content)
    whole = _post(http, "/api/generate", {"model": "tiny", "prompt": "the cat", "stream": False,
                                          "options": {"num_predict": tokens}})
    assert "".join(line["response"] for line in content) == whole["response"]


@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_streamed_chat_is_one_line_per_token(http: httpx.Client, tokens: int) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}],
            "options": {"num_predict": tokens}}
    *content, final = _stream(http, "/api/chat", body)
    assert final["done"] is True and final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] == tokens
    assert len(content) == tokens
    assert all(line["message"]["role"] == "assistant" and line["message"]["content"] for line in content)


@pytest.fixture(scope="module")
def bytes_model(http: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny model whose greedy output includes raw byte tokens (split and stray UTF-8)."""
    path = write_tiny_llama(tmp_path_factory.mktemp("gguf-bytes") / "bytes.gguf", seed=3, emit_bytes=True)
    create_model(http, "tiny-bytes", path, parameters={"temperature": 0, "seed": 1, "num_ctx": 256})
    yield "tiny-bytes"
    http.post("/api/generate", json={"model": "tiny-bytes", "keep_alive": 0})
    http.request("DELETE", "/api/delete", json={"model": "tiny-bytes"})


def _piece(token: str) -> bytes:
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        return bytes([int(token[3:5], 16)])
    return token.replace(SPACE, " ").encode()


def test_a_token_ending_inside_a_utf8_character_waits_for_the_next(http: httpx.Client, bytes_model: str) -> None:
    tokens = 48
    *content, final = _stream(http, "/api/generate", {"model": bytes_model, "prompt": "the cat",
                                                      "options": {"num_predict": tokens}})
    assert final["eval_count"] == tokens
    generated = final["context"][-tokens:]
    vocab = build_vocab()[0]
    # What the runner may release after each token: only text that can no longer change.
    text = TextStream()
    expected = [piece for piece in (text.feed(_piece(vocab[t]))[0] for t in generated) if piece]
    if rest := text.flush():
        expected.append(rest)
    assert len(expected) < tokens, "this model's output should hold some bytes back"
    assert [line["response"] for line in content] == expected


# ------------------------------------------------------------------ /api/ps


def test_ps_lists_a_model_once_whatever_options_loaded_it(http: httpx.Client) -> None:
    def rows() -> list[dict[str, Any]]:
        return [m for m in http.get("/api/ps").json()["models"] if m["name"] == "tiny:latest"]

    # Three load specs of one model: the model's own, another batch size, another context size.
    _post(http, "/api/generate", {"model": "tiny", "prompt": "the cat", "stream": False,
                                  "options": {"num_predict": 2}})
    assert len(rows()) == 1
    _post(http, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                              "options": {"num_predict": 2, "num_batch": 64}})
    assert len(rows()) == 1
    embedded = _post(http, "/api/embed", {"model": "tiny", "input": "hello", "options": {"num_ctx": 128}})
    assert len(embedded["embeddings"]) == 1
    assert len(rows()) == 1
    _post(http, "/api/generate", {"model": "tiny", "prompt": "the cat", "stream": False,
                                  "options": {"num_predict": 2}})
    (row,) = rows()
    assert row["context_length"] == 256
