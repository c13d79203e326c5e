"""Pull and push through a real node process with the official ``ollama`` client, against the
test registry; the pulled model is a real GGUF that the node then runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import ollama
import pytest

from omx.storage.manifests import Manifest
from tests.conftest import TINY_TEMPLATE
from tests.support.node import NodeProcess, start_node
from tests.support.registry_fixtures import MODEL_TYPE, PARAMS_TYPE, TEMPLATE_TYPE
from tests.support.registry_server import RegistryServer

pytestmark = pytest.mark.e2e

CONFIG = (b'{"model_format":"gguf","model_family":"llama","model_families":["llama"],"model_type":"1M",'
          b'"file_type":"F32","architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}')


async def _node(home: Path, registry: str) -> NodeProcess:
    env = {"OMX_MODELS__REGISTRY": registry, "OMX_MODELS__INSECURE": "true", "OMX_ENGINE__NUM_CTX": "256"}
    return await asyncio.to_thread(start_node, home, env=env)


async def test_ollama_client_pull_run_push_and_pull_elsewhere(tmp_path: Path, tiny_gguf: Path) -> None:
    weights = await asyncio.to_thread(tiny_gguf.read_bytes)
    layers = [(MODEL_TYPE, weights), (TEMPLATE_TYPE, TINY_TEMPLATE.encode()),
              (PARAMS_TYPE, b'{"temperature":0,"num_predict":6}')]
    source = await RegistryServer().start()
    target = await RegistryServer(host="127.0.0.3").start()
    manifest = Manifest.from_bytes(source.add_model("library/tiny", "v1", CONFIG, layers))
    a = await _node(tmp_path / "a", source.netloc)
    b = None
    client = ollama.AsyncClient(host=a.url, timeout=120)
    try:
        progress = [p async for p in await client.pull("tiny:v1", stream=True)]
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        layer_lines = [p for p in progress if p.digest]
        assert {p.digest for p in layer_lines} == set(manifest.blobs)
        assert all(p.status == f"pulling {p.digest[7:19]}" and p.total for p in layer_lines)
        assert any(p.completed == p.total for p in layer_lines)

        reply = await client.generate(model=f"{source.netloc}/library/tiny:v1", prompt="hello world")
        assert reply.done and reply.eval_count == 6 and reply.response

        dest = f"{target.netloc}/team/tiny:v2"
        await client.copy(f"{source.netloc}/library/tiny:v1", dest)
        pushed = [p async for p in await client.push(dest, insecure=True, stream=True)]
        assert pushed[0].status == "retrieving manifest" and pushed[-1].status == "success"

        b = await _node(tmp_path / "b", target.netloc)
        client_b = ollama.AsyncClient(host=b.url, timeout=120)
        final = await client_b.pull("team/tiny:v2", stream=False)
        await client_b.close()
        assert final.status == "success"
        async with httpx.AsyncClient(base_url=b.url) as http:
            shown = (await http.post("/api/show", json={"model": dest})).json()
        assert shown["model_info"]["general.architecture"] == "llama"
        for digest in manifest.blobs:
            name = digest.replace(":", "-")
            held_a = tmp_path / "a" / "data" / "models" / "blobs" / name
            held_b = tmp_path / "b" / "data" / "models" / "blobs" / name
            assert await asyncio.to_thread(held_a.read_bytes) == await asyncio.to_thread(held_b.read_bytes)
    finally:
        await client.close()
        await asyncio.to_thread(a.stop)
        if b is not None:
            await asyncio.to_thread(b.stop)
        await source.stop()
        await target.stop()
