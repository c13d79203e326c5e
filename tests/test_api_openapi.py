"""``/openapi.json``: a valid OpenAPI 3.1 document that says what the handlers enforce.

A real validator (``openapi-spec-validator``) checks the document. Schemathesis then
generates requests from it against a live node (every operation: Ollama, OpenAI, cluster,
functions and ``/fn``, peer): no answer may be a 5xx, carry a traceback or differ from the
documented schema and media type; the node's log holds no traceback; the store passes a deep
fsck and changed only by requests the node accepted. On the Ollama and OpenAI endpoints a
request the document calls valid is accepted while one it calls invalid is refused. A node
with API keys is fuzzed with its key, and every guarded operation refuses a request without
it. The default run generates a few hundred requests; the ``soak`` run (``scripts/soak.sh``)
at least 10,000 (``OMX_FUZZ_EXAMPLES`` per operation, default 300). Pull and push (they reach
for a registry), cluster leave (it would take the node out of its cluster) and the WebSocket
feed (not in the document) are left out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from openapi_spec_validator import validate

from omx.functions.openapi import MODEL_NAME_PATTERN
from omx.storage import ModelStore
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


KEY = "fuzz-key"
MUTATING = re.compile(r"^/api/(copy|delete|create|blobs/[^/]+)$")


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


@pytest.fixture(scope="module")
def keyed_node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[NodeProcess]:
    """A node whose client endpoints need ``Authorization: Bearer fuzz-key`` (``security.api_keys``)."""
    proc = start_node(tmp_path_factory.mktemp("fuzz-keyed"), env={"OMX_ENGINE__NUM_CTX": "256",
                                                                  "OMX_SECURITY__API_KEYS": json.dumps([KEY])})
    try:
        with proc.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE, parameters={"num_predict": 4})
        yield proc
    finally:
        proc.stop()


def _schemathesis(node: NodeProcess, workdir: Path, *args: str, examples: int = 12,
                  timeout: float = 400) -> subprocess.CompletedProcess[str]:
    # Run in a temp folder: schemathesis keeps a cache folder in its working directory.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    cmd = [SCHEMATHESIS, "run", node.url + "/openapi.json", "--url", node.url, "--phases", "examples,fuzzing",
           "--max-examples", str(examples), "--seed", "1", "--workers", "2", "--no-color", "--request-timeout",
           "60", "--generation-database", "none", "--exclude-path-regex", NEVER, *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class StoreState:
    models: dict[str, str]
    """Name -> manifest digest."""
    blobs: frozenset[str]


def store_state(node: NodeProcess) -> StoreState:
    store = ModelStore(node.home / "data" / "models")
    return StoreState({e.name: e.digest for e in store.list_models_sync()}, frozenset(store.blobs.digests()))


def exchanges(har_path: Path) -> list[dict[str, Any]]:
    """The requests schemathesis sent and the answers (its HAR report)."""
    entries: list[dict[str, Any]] = json.loads(har_path.read_text())["log"]["entries"]
    return entries


def check_store(node: NodeProcess, before: StoreState, entries: list[dict[str, Any]]) -> None:
    """Every change to the store was made by a request the node accepted; the store passes a deep fsck."""
    store = ModelStore(node.home / "data" / "models")
    assert store.check_sync(deep=True) == []
    after = store_state(node)
    accepted = [e for e in entries if MUTATING.match(urlsplit(e["request"]["url"]).path)
                and 200 <= e["response"]["status"] < 300]
    bodies = [e["request"].get("postData", {}).get("text", "") for e in accepted]
    for name in set(after.models) - set(before.models):  # added: by an accepted copy or create naming it
        short = name.removesuffix(":latest").split("/")[-1]
        assert any(short in body for body in bodies), (name, bodies[:20])
    for name in set(before.models) - set(after.models):  # gone: by an accepted delete
        short = name.removesuffix(":latest").split("/")[-1]
        assert any(e["request"]["method"] == "DELETE" and short in e["request"].get("postData", {}).get("text", "")
                   for e in accepted), name
    changed = {n for n in before.models if n in after.models and before.models[n] != after.models[n]}
    assert not changed or accepted, changed
    if not accepted:
        assert after == before


def check_log(node: NodeProcess) -> None:
    log = node.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


FUZZ_CHECKS = "not_a_server_error,no_traceback,response_schema_conformance,content_type_conformance"


def fuzz(node: NodeProcess, workdir: Path, *args: str, examples: int = 12, timeout: float = 400
         ) -> list[dict[str, Any]]:
    """Run schemathesis's checks on every operation; then the node's log and store. Returns the exchanges."""
    before = store_state(node)
    har = workdir / "fuzz.har"
    result = _schemathesis(node, workdir, "--checks", FUZZ_CHECKS, "--report", "har", "--report-har-path", str(har),
                           *args, examples=examples, timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    entries = exchanges(har)
    assert entries, result.stdout[-3000:]
    assert not [e for e in entries if e["response"]["status"] >= 500]
    check_log(node)
    check_store(node, before, entries)
    return entries


@pytest.mark.parametrize("path", ["/v1/models/%0Ab%0A", "/v1/nothing"])
def test_an_unrouted_openai_path_answers_an_openai_error(fuzz_node: NodeProcess, path: str) -> None:
    """Found by fuzzing: a /v1 path no route matches answered Ollama's error shape, not OpenAI's."""
    r = httpx.get(fuzz_node.url + path, timeout=30)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "not_found_error" and "404 page not found" in error["message"]
    assert httpx.get(fuzz_node.url + "/api/nothing", timeout=30).json() == {"error": "404 page not found: /api/nothing"}


def test_the_document_lists_the_cluster_and_function_endpoints(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for path in ("/api/functions", "/api/functions/{name}", "/api/functions/{name}/rollback", "/fn/{path}",
                 "/api/distributed/traffic", "/api/distributed/status", "/api/distributed/nodes",
                 "/api/distributed/migrate", "/api/distributed/verify", "/api/distributed/replicate",
                 "/api/distributed/rebalance", "/health", "/metrics"):
        assert path in paths, path
    assert {"get", "post"} <= set(paths["/api/functions"])


def test_the_document_states_empty_answers_and_own_media_types(document: dict[str, Any]) -> None:
    """Found by fuzzing: answers without a body (copy, delete, upload, any HEAD) and the CA's PEM type."""
    paths = document["paths"]
    assert "content" not in paths["/api/delete"]["delete"]["responses"]["200"]
    assert "content" not in paths["/api/copy"]["post"]["responses"]["200"]
    assert set(paths["/api/blobs/{digest}"]["post"]["responses"]) == {"200", "201", "default"}
    assert "content" not in paths["/api/blobs/{digest}"]["head"]["responses"]["default"]
    assert set(paths["/api/cluster/ca"]["get"]["responses"]["200"]["content"]) == {"application/x-pem-file"}


def test_fuzzing_finds_no_server_error_and_no_traceback(fuzz_node: NodeProcess, tmp_path: Path) -> None:
    entries = fuzz(fuzz_node, tmp_path)
    paths = {urlsplit(e["request"]["url"]).path for e in entries}
    assert "/api/distributed/traffic" in paths and "/api/functions" in paths
    assert any(p.startswith("/fn/") for p in paths)


def test_fuzzing_a_node_with_api_keys(keyed_node: NodeProcess, tmp_path: Path) -> None:
    fuzz(keyed_node, tmp_path, "-H", f"Authorization: Bearer {KEY}", examples=4)


def test_without_the_key_every_guarded_operation_is_refused(keyed_node: NodeProcess) -> None:
    """Every operation the document guards (API key or peer signature) answers 401 without it, and
    the store stays as it was."""
    doc = httpx.get(keyed_node.url + "/openapi.json", timeout=30).json()
    before = store_state(keyed_node)
    values = {"digest": "sha256:" + "0" * 64, "model": "tiny"}
    guarded = 0
    with keyed_node.client(timeout=30) as client:
        for path, operations in doc["paths"].items():
            if re.search(NEVER, path):
                continue
            url = re.sub(r"{(\w+)}", lambda m: values.get(m.group(1), "tiny"), path)
            for method, op in operations.items():
                r = client.request(method.upper(), url, json={"model": "tiny"} if method != "get" else None)
                if "security" in op:
                    guarded += 1
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                else:
                    assert r.status_code != 401, (method, path)
    assert guarded > 50
    check_log(keyed_node)
    assert store_state(keyed_node) == before


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_fuzzing_at_length(fuzz_node: NodeProcess, keyed_node: NodeProcess, tmp_path: Path) -> None:
    """At least 10,000 generated requests (``scripts/soak.sh``), with API keys off and on."""
    started = time.monotonic()
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    total = len(fuzz(fuzz_node, tmp_path / "off", examples=int(os.environ.get("OMX_FUZZ_EXAMPLES", "300")),
                     timeout=5400))
    total += len(fuzz(keyed_node, tmp_path / "on", "-H", f"Authorization: Bearer {KEY}",
                      examples=int(os.environ.get("OMX_FUZZ_EXAMPLES", "300")) // 3, timeout=3600))
    print(f"fuzz: {total} requests in {time.monotonic() - started:.0f} s, 0 findings")
    assert total >= 10_000, total


def test_the_ollama_and_openai_endpoints_accept_what_the_document_allows(fuzz_node: NodeProcess,
                                                                         tmp_path: Path) -> None:
    # Left out: uploads (the body must hash to the digest in the path) and create (the blobs it
    # names must have been uploaded): what makes them valid is state, not shape.
    result = _schemathesis(fuzz_node, tmp_path, "--checks", "positive_data_acceptance,negative_data_rejection",
                           "--include-tag", "ollama", "--include-tag", "openai",
                           "--exclude-operation-id", "blob_upload", "--exclude-operation-id", "create")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
