"""``/api/pull`` and ``/api/push`` over a real HTTP server, with httpx and the official ollama client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import ollama
import pytest

from omx.storage.manifests import Manifest
from tests.support.registry_fixtures import make_layers
from tests.support.registry_node import api_node
from tests.support.registry_server import RegistryServer


@pytest.fixture
async def server() -> AsyncIterator[RegistryServer]:
    srv = await RegistryServer().start()
    yield srv
    await srv.stop()


async def _ndjson(url: str, path: str, body: dict[str, object]) -> tuple[int, list[dict[str, object]]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http, http.stream("POST", path, json=body) as r:
        lines = [json.loads(line) async for line in r.aiter_lines() if line.strip()]
        return r.status_code, lines


async def test_api_pull_streams_ollama_lines_and_lists_the_model(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    manifest = Manifest.from_bytes(server.add_model("library/tiny", "latest", config, layers))
    async with api_node(tmp_path, server.netloc) as node:
        status, lines = await _ndjson(node.url, "/api/pull", {"model": "tiny"})
        async with httpx.AsyncClient(base_url=node.url) as http:
            tags = (await http.get("/api/tags")).json()
    assert status == 200
    assert lines[0] == {"status": "pulling manifest"}
    assert [line["status"] for line in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    for line in lines[1:-3]:
        assert line["status"] == f"pulling {str(line['digest'])[7:19]}"
        assert isinstance(line["total"], int)
    assert {line["digest"] for line in lines if "digest" in line} == set(manifest.blobs)
    assert [m["name"] for m in tags["models"]] == [f"{server.netloc}/library/tiny:latest"]
    assert tags["models"][0]["size"] == manifest.total_size


async def test_api_pull_without_stream_and_errors(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers(1000)
    server.add_model("library/small", "latest", config, layers)
    async with api_node(tmp_path, server.netloc) as node, httpx.AsyncClient(base_url=node.url) as http:
        done = await http.post("/api/pull", json={"model": "small", "stream": False})
        missing_status, missing = await _ndjson(node.url, "/api/pull", {"model": "absent"})
        bad = await http.post("/api/pull", json={"model": "../etc"})
        empty = await http.post("/api/pull", json={})
        pulls = (await http.get("/api/pulls")).json()
    assert done.status_code == 200 and done.json() == {"status": "success"}
    assert missing_status == 200
    assert missing[0] == {"status": "pulling manifest"}
    assert set(missing[-1]) == {"error"} and "not found" in str(missing[-1]["error"])
    assert bad.status_code == 400 and "error" in bad.json()
    assert empty.status_code == 400 and empty.json() == {"error": "model is required"}
    assert pulls == {"pulls": []}


async def test_interrupted_pull_is_listed_as_downloading(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    manifest = Manifest.from_bytes(server.add_model("library/cut", "latest", config, layers))
    big = manifest.layers[0]
    server.drop_after[big.digest] = [5 * 65536 + 10, 5 * 65536 + 10]
    async with api_node(tmp_path, server.netloc, concurrency=1, max_retries=0, backoff=0.01) as node:
        _, lines = await _ndjson(node.url, "/api/pull", {"model": "cut"})
        async with httpx.AsyncClient(base_url=node.url) as http:
            pulls = (await http.get("/api/pulls")).json()["pulls"]
    assert "error" in lines[-1]
    assert len(pulls) == 1
    assert pulls[0]["name"] == f"{server.netloc}/library/cut:latest"
    assert pulls[0]["size"] == manifest.total_size
    assert 5 * 65536 <= pulls[0]["completed"] < manifest.total_size


async def test_ollama_client_push_then_pull_into_empty_store(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    source_manifest = server.add_model("library/orig", "latest", config, layers)
    target = await RegistryServer(host="127.0.0.3").start()
    try:
        async with api_node(tmp_path / "a", server.netloc) as a, httpx.AsyncClient(base_url=a.url) as http:
            client = ollama.AsyncClient(host=a.url)
            pulled = [p async for p in await client.pull("orig", stream=True)]
            assert pulled[-1].status == "success"
            assert any(p.digest and p.total and p.completed for p in pulled)
            copy = {"source": f"{server.netloc}/library/orig:latest", "destination": f"{target.netloc}/team/copy:v1"}
            copied = await http.post("/api/copy", json=copy)
            assert copied.status_code == 200
            pushed = [p async for p in await client.push(f"{target.netloc}/team/copy:v1", insecure=True,
                                                          stream=True)]
            await client.close()
        statuses = [p.status for p in pushed]
        assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
        assert all(s.startswith("pushing ") for s in statuses[1:-2])
        assert any(p.digest and p.total == p.completed for p in pushed)
        async with api_node(tmp_path / "b", target.netloc) as b, httpx.AsyncClient(base_url=b.url) as http_b:
            client = ollama.AsyncClient(host=b.url)
            final = await client.pull("team/copy:v1", insecure=True, stream=False)
            await client.close()
            assert final.status == "success"
            tags = (await http_b.get("/api/tags")).json()["models"]
    finally:
        await target.stop()
    manifest = Manifest.from_bytes(source_manifest)
    assert set(target.blobs) == set(manifest.blobs)
    for digest in manifest.blobs:
        name = digest.replace(":", "-")
        assert (tmp_path / "b" / "blobs" / name).read_bytes() == (tmp_path / "a" / "blobs" / name).read_bytes()
    pushed_manifest = target.manifests[("team/copy", "v1")]
    assert Manifest.from_bytes(pushed_manifest).blobs == manifest.blobs
    stored = (tmp_path / "b" / "manifests" / target.netloc / "team" / "copy" / "v1").read_bytes()
    assert stored == pushed_manifest
    assert tags[0]["name"] == f"{target.netloc}/team/copy:v1"
