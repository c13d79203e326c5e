"""The integrations people use, unchanged, against a real node: LangChain,
LlamaIndex, LiteLLM and the official JavaScript client.

Each library is imported only once a guard refuses (and records) every
connection or name lookup beyond loopback, so a library that tries to reach
the internet at import or call time fails the suite instead of waiting on the
network. Streams are checked for the wire's one-line-per-token rule as each
library sees it: as many content chunks as the reply's ``eval_count``.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import shutil
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.node import NodeProcess

pytestmark = [
    pytest.mark.e2e,
    # LiteLLM's own types under this pydantic: a warning about LiteLLM's code, not about omx's wire.
    pytest.mark.filterwarnings("ignore:Item '.*' on TypedDict class .* `ReadOnly` qualifier:UserWarning"),
    # LlamaIndex and LiteLLM keep HTTP clients they never close: their sockets' warnings are about them.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

TOKENS = 8
JS_DIR = Path(__file__).parent / "js"

# LiteLLM fetches its model cost map from the network at import unless told to use its bundled copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.pop("LANGCHAIN_TRACING_V2", None)
os.environ.pop("LANGSMITH_TRACING", None)


def _loopback(host: object) -> bool:
    if host is None:
        return True
    text = host.decode() if isinstance(host, bytes) else str(host)
    return text in ("localhost", "::1", "") or text.startswith("127.")


class _Offline:
    """Refuses and records connections and name lookups that would leave this machine."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._connect = socket.socket.connect
        self._connect_ex = socket.socket.connect_ex
        self._getaddrinfo = socket.getaddrinfo

    def install(self) -> None:
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            guard._check(sock, address)
            guard._connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard._check(sock, address)
            return guard._connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if not _loopback(host):
                guard.attempts.append(f"lookup {host}")
                raise socket.gaierror(socket.EAI_NONAME, f"tests run offline: no lookup of {host}")
            return guard._getaddrinfo(host, *args, **kwargs)

        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = getaddrinfo

    def uninstall(self) -> None:
        socket.socket.connect = self._connect  # type: ignore[method-assign]
        socket.socket.connect_ex = self._connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = self._getaddrinfo

    def _check(self, sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            self.attempts.append(f"connect {address}")
            raise OSError(f"tests run offline: no connection to {address}")


@pytest.fixture(scope="module")
def offline() -> Iterator[_Offline]:
    guard = _Offline()
    guard.install()
    try:
        yield guard
    finally:
        guard.uninstall()
    assert guard.attempts == [], f"a library tried to reach the network: {guard.attempts}"


@pytest.fixture(scope="module", autouse=True)
def _collect_library_clients() -> Iterator[None]:
    """Collect the clients those libraries dropped while their warnings are still silenced here."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _load(offline: _Offline, name: str) -> ModuleType:
    """Import ``name`` under the guard."""
    return importlib.import_module(name)


def _unit_norm(vector: list[float]) -> bool:
    return math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-3)


# ------------------------------------------------------------------ LangChain


def test_langchain_chat_ollama_invoke_and_stream(node: NodeProcess, offline: _Offline) -> None:
    chat_models = _load(offline, "langchain_ollama")
    llm = chat_models.ChatOllama(model="tiny", base_url=node.url, temperature=0, seed=42, num_predict=TOKENS)
    reply = llm.invoke("the cat")
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["done_reason"] == "length"
    assert reply.response_metadata["eval_count"] == TOKENS
    assert reply.usage_metadata["output_tokens"] == TOKENS and reply.usage_metadata["input_tokens"] > 0

    chunks = list(llm.stream("the cat"))
    content = [c for c in chunks if c.content]
    assert len(content) == TOKENS
    assert "".join(c.content for c in content) == reply.content
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.response_metadata["done_reason"] == "length"
    assert merged.response_metadata["eval_count"] == TOKENS


def test_langchain_ollama_embeddings(node: NodeProcess, offline: _Offline) -> None:
    embeddings = _load(offline, "langchain_ollama").OllamaEmbeddings(model="tiny", base_url=node.url)
    docs = embeddings.embed_documents(["hello world", "the cat"])
    assert len(docs) == 2 and all(len(v) == 64 and _unit_norm(v) for v in docs)
    assert docs[0] != docs[1]
    assert embeddings.embed_query("hello world") == pytest.approx(docs[0], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ LlamaIndex


def _llama_index_llm(node: NodeProcess, offline: _Offline) -> Any:
    llms = _load(offline, "llama_index.llms.ollama")
    return llms.Ollama(model="tiny", base_url=node.url, request_timeout=120.0, temperature=0,
                       additional_kwargs={"seed": 42, "num_predict": TOKENS})


def test_llama_index_complete_and_stream(node: NodeProcess, offline: _Offline) -> None:
    llm = _llama_index_llm(node, offline)
    assert llm.metadata.context_window == 256  # read from /api/show
    whole = llm.complete("the cat")
    assert whole.text
    assert whole.raw["done_reason"] == "length" and whole.raw["eval_count"] == TOKENS
    deltas = [r.delta for r in llm.stream_complete("the cat") if r.delta]
    assert len(deltas) == TOKENS
    assert "".join(deltas) == whole.text


def test_llama_index_chat_and_stream(node: NodeProcess, offline: _Offline) -> None:
    llm = _llama_index_llm(node, offline)
    message = _load(offline, "llama_index.core.llms").ChatMessage(role="user", content="hello world")
    reply = llm.chat([message])
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.raw["eval_count"] == TOKENS
    deltas = [r.delta for r in llm.stream_chat([message]) if r.delta]
    assert len(deltas) == TOKENS
    assert "".join(deltas) == reply.message.content


def test_llama_index_embeddings(node: NodeProcess, offline: _Offline) -> None:
    module = _load(offline, "llama_index.embeddings.ollama")
    embedder = module.OllamaEmbedding(model_name="tiny", base_url=node.url)
    one = embedder.get_text_embedding("hello world")
    batch = embedder.get_text_embedding_batch(["hello world", "the cat"])
    assert len(one) == 64 and _unit_norm(one)
    assert batch[0] == pytest.approx(one, rel=1e-5, abs=1e-6) and batch[1] != batch[0]
    assert embedder.get_query_embedding("the cat") == pytest.approx(batch[1], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ LiteLLM


@pytest.mark.parametrize("prefix", ["ollama", "ollama_chat"])
def test_litellm_completion(node: NodeProcess, offline: _Offline, prefix: str) -> None:
    litellm = _load(offline, "litellm")
    kwargs: dict[str, Any] = {"model": f"{prefix}/tiny", "api_base": node.url, "temperature": 0, "seed": 42,
                              "max_tokens": TOKENS, "messages": [{"role": "user", "content": "the cat"}]}
    # LiteLLM maps Ollama's done_reason on its ollama_chat/ route; its ollama/ route always says "stop".
    finish = "length" if prefix == "ollama_chat" else "stop"
    reply = litellm.completion(**kwargs)
    choice = reply.choices[0]
    assert choice.message.content and choice.finish_reason == finish
    assert reply.usage.completion_tokens == TOKENS and reply.usage.prompt_tokens > 0

    chunks = list(litellm.completion(**kwargs, stream=True))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == TOKENS
    assert "".join(content) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]


# ------------------------------------------------------------------ ollama-js


@pytest.fixture(scope="module")
def node_js() -> str:
    exe = shutil.which("node")
    if exe is None or not (JS_DIR / "node_modules" / "ollama").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("node and tests/js/node_modules are installed by scripts/setup.sh --test")
        pytest.skip("node or the npm 'ollama' package is missing (scripts/setup.sh --test installs them)")
    return exe


def test_ollama_js_chat_stream_and_embed(node: NodeProcess, node_js: str) -> None:
    done = subprocess.run([node_js, str(JS_DIR / "check.mjs"), node.url, "tiny"], capture_output=True,
                          text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")}, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    chat = seen["chat"]
    assert chat["done"] and chat["done_reason"] == "length" and chat["eval_count"] == 6
    assert chat["message"]["role"] == "assistant" and chat["message"]["content"]

    *content, final = seen["chatParts"]
    assert final["done"] and final["eval_count"] == 6 and len(content) == 6
    assert "".join(p["message"]["content"] for p in content) == chat["message"]["content"]

    *pieces, last = seen["generateParts"]
    assert last["done"] and last["eval_count"] == 6 and len(pieces) == 6
    assert all(p["response"] and not p["done"] for p in pieces)

    vectors = seen["embed"]["embeddings"]
    assert len(vectors) == 2 and all(len(v) == 64 and _unit_norm(v) for v in vectors)
    assert [m["name"] for m in seen["ps"]["models"]].count("tiny:latest") == 1
