"""``/openapi.json``: a valid OpenAPI 3.1 document that says what the handlers enforce.

A real validator (``openapi-spec-validator``) checks the document. Schemathesis then
generates requests from it against a live node: no answer may be a 5xx or carry a
traceback, and on the Ollama and OpenAI endpoints a request the document calls valid
is accepted while one it calls invalid is refused. Pull and push (they reach for a
registry), cluster leave (it would take the node out of its cluster) and the WebSocket
feed (not in the document) are left out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from omx.functions.openapi import MODEL_NAME_PATTERN
from omx.storage.names import ModelName
from tests.conftest import TINY_TEMPLATE
from tests.support.node import NodeProcess, create_model, start_node

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
NEVER = "/api/(pull|push|cluster/leave)$"


@pytest.fixture(scope="module")
def document(node: NodeProcess) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(node.url + "/openapi.json", timeout=30).json()
    return doc


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")
    for path, operations in document["paths"].items():
        assert ":" not in path, path  # no routing converters such as {model:path}
        for op in operations.values():
            declared = {p["name"] for p in op.get("parameters", ())}
            assert declared == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path


def test_the_document_states_the_rules_handlers_enforce(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "user", "assistant", "tool"]
    assert "" not in schemas["OAIMessage"]["properties"]["role"]["enum"]
    generate = schemas["GenerateRequest"]
    assert generate["anyOf"] == [{"required": ["model"], "properties": {"model": pytest.approx(
        generate["anyOf"][0]["properties"]["model"])}}, generate["anyOf"][1]]
    assert generate["properties"]["images"]["maxItems"] == 0
    assert document["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["schema"]["pattern"] == MODEL_NAME_PATTERN


@pytest.mark.parametrize("name", ["tiny", "library/tiny:latest", "registry.ollama.ai/library/qwen2.5:0.5b",
                                  "localhost:5000/me/m-1_x:v1.2", "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M",
                                  "a" * 40 + ".b" + ":" + "c" * 40 + ".d.e"])
def test_names_the_pattern_allows_are_model_names(name: str) -> None:
    import re

    assert re.fullmatch(MODEL_NAME_PATTERN.strip("^$"), name)
    ModelName.parse(name)


def test_names_the_pattern_allows_always_parse() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.from_regex(MODEL_NAME_PATTERN, fullmatch=True))
    def parses(name: str) -> None:
        ModelName.parse(name)

    parses()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "narrator", "content": "hi"}]}),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "", "content": "hi"}]}),
])
def test_a_message_without_a_known_role_is_refused(node: NodeProcess, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(node.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "role" in (error["message"] if isinstance(error, dict) else error)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[NodeProcess]:
    """A node of its own: the fuzzer learns model names from /api/tags, then loads, copies and deletes them."""
    proc = start_node(tmp_path_factory.mktemp("fuzz-home"), env={"OMX_ENGINE__NUM_CTX": "256"})
    try:
        with proc.client() as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE, parameters={"num_predict": 4})
        yield proc
    finally:
        proc.stop()


def _schemathesis(node: NodeProcess, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Run in a temp folder: schemathesis keeps a cache folder in its working directory.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    cmd = [SCHEMATHESIS, "run", node.url + "/openapi.json", "--url", node.url, "--phases", "examples,fuzzing",
           "--max-examples", "12", "--seed", "1", "--workers", "2", "--no-color", "--request-timeout", "60",
           "--generation-database", "none", "--exclude-path-regex", NEVER, *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)


def test_fuzzing_finds_no_server_error_and_no_traceback(fuzz_node: NodeProcess, tmp_path: Path) -> None:
    result = _schemathesis(fuzz_node, tmp_path, "--checks", "not_a_server_error,no_traceback")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_ollama_and_openai_endpoints_accept_what_the_document_allows(fuzz_node: NodeProcess,
                                                                         tmp_path: Path) -> None:
    # Left out: uploads (the body must hash to the digest in the path) and create (the blobs it
    # names must have been uploaded): what makes them valid is state, not shape.
    result = _schemathesis(fuzz_node, tmp_path, "--checks", "positive_data_acceptance,negative_data_rejection",
                           "--include-tag", "ollama", "--include-tag", "openai",
                           "--exclude-operation-id", "blob_upload", "--exclude-operation-id", "create")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
