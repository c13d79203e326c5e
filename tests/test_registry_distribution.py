"""Push to and pull from a registry nobody here wrote: Debian's ``docker-registry`` (Docker distribution)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from omx.storage.blobs import BlobStore
from omx.storage.manifests import Manifest
from omx.storage.names import ModelName
from omx.storage.registry.pending import FileManifests
from tests.support.registry_fixtures import CHUNK, collect, make_client, make_layers
from tests.support.registry_server import build_manifest

pytestmark = pytest.mark.e2e

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def distribution(tmp_path: Path) -> Iterator[str]:
    if not Path(BINARY).exists():
        pytest.fail("docker-registry is not installed (Debian package docker-registry)")
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry-data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (tmp_path / "registry.log").open("wb")
    proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    netloc = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://{netloc}/v2/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("docker-registry did not start: " + (tmp_path / "registry.log").read_text())
            time.sleep(0.1)
        yield netloc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        log.close()


def _seed(root: Path, name: ModelName) -> bytes:
    """A model written straight into a store, as ``omx create`` would leave it."""
    config, layers = make_layers(12 * CHUNK + 5)
    blobs = BlobStore(root, chunk_size=CHUNK)
    for data in (config, *(d for _, d in layers)):
        blobs.write_bytes(data)
    manifest = build_manifest(config, layers)
    FileManifests(root).write_manifest(name, manifest)
    return manifest


async def test_push_to_docker_registry_and_pull_back(distribution: str, tmp_path: Path) -> None:
    name = ModelName.parse(f"{distribution}/omx/tiny:v1")
    manifest_bytes = await asyncio.to_thread(_seed, tmp_path / "a", name)
    manifest = Manifest.from_bytes(manifest_bytes)
    client_a, transport_a = make_client(tmp_path / "a", distribution)
    client_b, transport_b = make_client(tmp_path / "b", distribution)
    try:
        pushed = await collect(client_a.push("omx/tiny:v1"))
        again = await collect(client_a.push("omx/tiny:v1"))
        pulled = await collect(client_b.pull("omx/tiny:v1"))
    finally:
        await transport_a.aclose()
        await transport_b.aclose()
    assert pushed[0] == {"status": "retrieving manifest"} and pushed[-2:] == [
        {"status": "pushing manifest"}, {"status": "success"}]
    # The second push finds every blob already there (HEAD) and uploads nothing.
    assert all(line["completed"] == line["total"] for line in again if "digest" in line)
    assert len([line for line in again if "digest" in line]) == len(manifest.blobs)
    assert pulled[-1] == {"status": "success"}
    for digest in manifest.blobs:
        f = digest.replace(":", "-")
        assert (tmp_path / "b" / "blobs" / f).read_bytes() == (tmp_path / "a" / "blobs" / f).read_bytes()
    stored = name.manifest_path(tmp_path / "b").read_bytes()
    assert Manifest.from_bytes(stored).blobs == manifest.blobs
    assert stored == manifest_bytes
