"""Pure parts of the registry client: part planning, challenge parsing, progress wire form, URLs."""

from __future__ import annotations

from omx.storage.names import ModelName
from omx.storage.registry import LayerProgress, Part, RegistryEndpoint, Status, parse_challenge, plan_parts
from omx.types import BlobDigest

D = BlobDigest("sha256:" + "0123456789ab" * 5 + "cdef")


def test_plan_parts_splits_missing_runs_for_concurrency() -> None:
    assert plan_parts([], 3) == []
    assert plan_parts(list(range(9)), 3) == [Part(0, 3), Part(3, 6), Part(6, 9)]
    assert plan_parts(list(range(10)), 3) == [Part(0, 4), Part(4, 8), Part(8, 10)]
    # Held chunks (4, 5) are never inside a part.
    assert plan_parts([0, 1, 2, 3, 6, 7], 1) == [Part(0, 4), Part(6, 8)]
    assert plan_parts([2], 8) == [Part(2, 3)]
    parts = plan_parts([1, 2, 3, 5, 8, 9, 10, 11, 12], 2)
    covered = [i for p in parts for i in range(p.first, p.end)]
    assert covered == [1, 2, 3, 5, 8, 9, 10, 11, 12]


def test_parse_challenge() -> None:
    c = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                        'scope="repository:ns/m:pull,push"')
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.example/token"
    assert c.params["service"] == "registry.example"
    assert c.params["scope"] == "repository:ns/m:pull,push"
    assert parse_challenge('Basic realm="x \\"y\\""').params == {"realm": 'x "y"'}
    assert parse_challenge("Basic").scheme == "basic"


def test_progress_wire_form_omits_zero_fields_like_go() -> None:
    assert Status("success").to_ollama() == {"status": "success"}
    assert LayerProgress("pulling", D, 100, 0).to_ollama() == {
        "status": "pulling 0123456789ab", "digest": D, "total": 100}
    assert LayerProgress("pushing", D, 100, 40).to_ollama() == {
        "status": "pushing 0123456789ab", "digest": D, "total": 100, "completed": 40}


def test_endpoint_urls() -> None:
    e = RegistryEndpoint.for_model(ModelName.parse("llama3"))
    assert e.manifest_url == "https://registry.ollama.ai/v2/library/llama3/manifests/latest"
    assert e.blob_url(D) == f"https://registry.ollama.ai/v2/library/llama3/blobs/{D}"
    local = RegistryEndpoint.for_model(ModelName.parse("localhost:5000/team/m:v1"), insecure=True)
    assert local.uploads_url == "http://localhost:5000/v2/team/m/blobs/uploads/"
    assert local.resolve("/v2/team/m/blobs/uploads/abc?x=1") == "http://localhost:5000/v2/team/m/blobs/uploads/abc?x=1"
    assert local.resolve("https://other/u") == "https://other/u"
    assert local.push_scope == "repository:team/m:pull,push"
