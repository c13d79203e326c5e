"""Bad input gets ``{"error": ...}`` with the right status, and the store is left unchanged."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.support.node import NodeProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http(node: NodeProcess) -> httpx.Client:
    with node.client() as client:
        yield client


def _store_listing(node: NodeProcess) -> list[str]:
    root = node.home / "data" / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "tmp" not in p.parts)


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in r.text
    return body["error"]


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/show", "/api/create", "/api/embed",
                                  "/api/copy", "/v1/chat/completions"])
def test_malformed_json_is_400(http: httpx.Client, path: str) -> None:
    r = http.post(path, content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_non_object_body_is_400(http: httpx.Client) -> None:
    assert "JSON object" in _error(http.post("/api/generate", json=["tiny"]), 400)


@pytest.mark.parametrize("body", [
    {"model": "tiny", "prompt": 5},
    {"model": "tiny", "prompt": "x", "stream": "maybe"},
    {"model": ["tiny"], "prompt": "x"},
    {"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}},
    {"model": "tiny", "prompt": "x", "options": {"num_predict": 1.5}},
    {"model": "tiny", "prompt": "x", "keep_alive": "forever"},
])
def test_wrong_types_are_400(http: httpx.Client, body: dict[str, object]) -> None:
    _error(http.post("/api/generate", json={**body, "stream": body.get("stream", False)}), 400)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../../b", "/abs/model", "bad name", "x:", "..",
                                  "a/b/c/d/e", "mod\x00el", "a" * 400])
def test_invalid_and_escaping_names_are_refused(node: NodeProcess, http: httpx.Client, name: str) -> None:
    before = _store_listing(node)
    _error(http.post("/api/copy", json={"source": "tiny", "destination": name}), 400)
    _error(http.post("/api/show", json={"model": name}), 400)
    assert _store_listing(node) == before


def test_missing_model_field_is_400(http: httpx.Client) -> None:
    assert "model is required" in _error(http.post("/api/generate", json={"prompt": "hi"}), 400)


def test_blob_with_wrong_digest_is_rejected_and_not_stored(node: NodeProcess, http: httpx.Client) -> None:
    before = _store_listing(node)
    data = b"these bytes do not hash to the digest in the path"
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    message = _error(http.post(f"/api/blobs/{wrong}", content=data), 400)
    assert "digest" in message
    assert http.head(f"/api/blobs/{wrong}").status_code == 404
    assert _store_listing(node) == before


def test_bad_digest_syntax_is_400(http: httpx.Client) -> None:
    _error(http.post("/api/blobs/sha256:nothex", content=b"x"), 400)
    # An encoded traversal never reaches a handler: no route has a slash in the digest.
    _error(http.post("/api/blobs/..%2F..%2Fetc", content=b"x"), 404)
    _error(http.post("/api/blobs/sha256-..", content=b"x"), 400)


def test_create_from_server_path_is_refused(node: NodeProcess, http: httpx.Client) -> None:
    before = _store_listing(node)
    r = http.post("/api/create", json={"model": "evil", "modelfile": "FROM /etc/passwd", "stream": False})
    assert r.status_code == 400 and "/api/blobs" in r.json()["error"]
    r = http.post("/api/create", json={"model": "evil", "stream": False,
                                       "files": {"x.gguf": "sha256:" + "0" * 64}})
    assert r.status_code == 400
    assert _store_listing(node) == before


def test_unknown_route_and_method(http: httpx.Client) -> None:
    _error(http.get("/api/nope"), 404)
    _error(http.get("/api/generate"), 405)


def test_openai_errors_use_openai_shape(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": "missing", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert "not found" in r.json()["error"]["message"]


def test_suffix_needs_a_template_with_suffix(http: httpx.Client) -> None:
    assert "insert" in _error(http.post("/api/generate", json={"model": "tiny", "prompt": "def f(", "suffix": "end",
                                                               "stream": False}), 400)


def test_openapi_document_lists_every_endpoint(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path, method in [("/api/generate", "post"), ("/api/chat", "post"), ("/api/tags", "get"),
                         ("/api/blobs/{digest}", "head"), ("/api/delete", "delete"), ("/v1/chat/completions", "post")]:
        assert method in doc["paths"][path], path
    schema = doc["components"]["schemas"]["GenerateRequest"]
    assert "prompt" in schema["properties"]
