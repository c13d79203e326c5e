"""The OpenAI-compatible endpoints of a real node, driven by the official ``openai`` client."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import openai
import pytest

from tests.support.node import NodeProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert "tiny:latest" in ids
    model = client.models.retrieve("tiny:latest")
    assert model.id == "tiny:latest" and model.object == "model" and model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing-model")


def test_chat_completion_matches_ollama_chat(client: openai.OpenAI, node: NodeProcess) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, seed=3, max_tokens=10)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    with node.client() as http:
        native = http.post("/api/chat", json={"model": "tiny", "messages": messages, "stream": False,
                                              "options": {"temperature": 0, "seed": 3, "num_predict": 10,
                                                          "top_p": 1.0}}).json()
    assert native["message"]["content"] == choice.message.content


def test_chat_completion_streams_sse_with_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the cat"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_text_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="a b c", temperature=0, max_tokens=6)
    assert r.object == "text_completion"
    assert r.choices[0].text and r.usage.completion_tokens == 6
    streamed = list(client.completions.create(model="tiny", prompt="a b c", temperature=0, max_tokens=6,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="tiny", input=["hello world", "the cat"])
    assert [d.index for d in r.data] == [0, 1]
    for d in r.data:
        assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-4)
    b64 = client.embeddings.create(model="tiny", input="hello world", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(r.data[0].embedding, rel=1e-5)
    assert r.usage.prompt_tokens > 0
    short = client.embeddings.create(model="tiny", input="hello world", dimensions=16).data[0].embedding
    assert len(short) == 16 and math.isclose(math.sqrt(sum(x * x for x in short)), 1.0, rel_tol=1e-4)


def test_json_mode_returns_json(client: openai.OpenAI) -> None:
    import json

    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "give json"}],
                                       temperature=0, max_tokens=40, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict | list)
    else:
        assert text.lstrip().startswith(("{", "["))


def test_images_to_a_model_without_vision_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert "image" in str(err.value)
