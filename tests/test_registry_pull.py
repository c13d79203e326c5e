"""Pulling from the test registry: layers, progress lines, resume, corruption, redirects, auth."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from omx.errors import IntegrityError, NotFound, RegistryError, StoreError, Unauthorized
from omx.storage.manifests import Manifest
from omx.storage.registry import Credentials
from tests.support.disk import fill, mount_tmpfs, unmount
from tests.support.registry_fixtures import CHUNK, collect, make_client, make_layers
from tests.support.registry_server import RegistryServer

_STATUS = re.compile(r"pulling [0-9a-f]{12}\Z")


@pytest.fixture
async def server() -> AsyncIterator[RegistryServer]:
    srv = await RegistryServer().start()
    yield srv
    await srv.stop()


def _store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock")


def _check_blobs(root: Path, manifest: Manifest) -> None:
    for digest in manifest.blobs:
        data = (root / "blobs" / digest.replace(":", "-")).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert (root / "chunks" / (digest.replace(":", "-") + ".json")).is_file()


async def test_pull_multilayer_model_with_ollama_progress_lines(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    manifest_bytes = server.add_model("library/tiny", "latest", config, layers)
    client, transport = make_client(tmp_path, server.netloc)
    try:
        lines = await collect(client.pull("tiny"))
    finally:
        await transport.aclose()
    manifest = Manifest.from_bytes(manifest_bytes)
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-3:] == [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                          {"status": "success"}]
    layer_lines = lines[1:-3]
    order = list(dict.fromkeys(line["digest"] for line in layer_lines))
    assert order == [*(layer.digest for layer in manifest.layers), manifest.config.digest]
    for line in layer_lines:
        assert set(line) <= {"status", "digest", "total", "completed"}
        assert _STATUS.match(line["status"]) and line["status"] == f"pulling {line['digest'][7:19]}"
        assert line["total"] == next(x.size for x in (*manifest.layers, manifest.config)
                                     if x.digest == line["digest"])
        assert line.get("completed", 0) <= line["total"]
    for digest in order:
        mine = [line.get("completed", 0) for line in layer_lines if line["digest"] == digest]
        assert mine == sorted(mine) and mine[-1] == next(line["total"] for line in layer_lines
                                                         if line["digest"] == digest)
    # The large layer went out as several ranged parts, and every byte was sent exactly once.
    big = manifest.layers[0]
    ranges = [h.get("range") for m, p, h in server.log if m == "GET" and p.endswith(big.digest)]
    assert len(ranges) >= 2 and all(r and r.startswith("bytes=") for r in ranges)
    assert server.sent[big.digest] == big.size
    stored = tmp_path / "manifests" / server.netloc / "library" / "tiny" / "latest"
    assert stored.read_bytes() == manifest_bytes
    _check_blobs(tmp_path, manifest)
    assert not list((tmp_path / "partial").glob("*"))
    assert not list((tmp_path / "pulls").glob("*"))


async def test_pull_skips_blobs_already_held(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    server.add_model("library/a", "latest", config, layers)
    server.add_model("library/b", "v1", config, [layers[0]])
    client, transport = make_client(tmp_path, server.netloc)
    try:
        await collect(client.pull("a"))
        before = dict(server.sent)
        lines = await collect(client.pull("b:v1"))
    finally:
        await transport.aclose()
    assert dict(server.sent) == before
    layer_lines = [line for line in lines if "digest" in line]
    assert all(line["completed"] == line["total"] for line in layer_lines)
    assert lines[-1] == {"status": "success"}


async def test_resume_after_dropped_connection_fetches_no_byte_twice(
    server: RegistryServer, tmp_path: Path
) -> None:
    config, layers = make_layers(40 * CHUNK + 7)
    manifest = Manifest.from_bytes(server.add_model("library/big", "latest", config, layers))
    big = manifest.layers[0]
    # First attempt: one part (concurrency 1), dropped at 10.5 chunks, and its retry dropped again
    # before a new chunk completes: the pull fails with ten chunks on disk.
    server.drop_after[big.digest] = [10 * CHUNK + CHUNK // 2, 10 * CHUNK + CHUNK // 2]
    client, transport = make_client(tmp_path, server.netloc, concurrency=1, max_retries=0)
    try:
        with pytest.raises(RegistryError, match="failed after retries"):
            await collect(client.pull("big"))
    finally:
        await transport.aclose()
    assert server.sent[big.digest] == 11 * CHUNK
    assert not (tmp_path / "blobs" / big.digest.replace(":", "-")).exists()
    assert list((tmp_path / "partial").glob("*.state.json"))
    # A new client (as after a restart) resumes from the ten chunks on disk.
    mark = len(server.log)
    client, transport = make_client(tmp_path, server.netloc)
    try:
        lines = await collect(client.pull("big"))
    finally:
        await transport.aclose()
    assert lines[-1] == {"status": "success"}
    first_big = next(line for line in lines if line.get("digest") == big.digest)
    assert first_big["completed"] == 10 * CHUNK
    # Only the two half chunks that were cut off are fetched a second time.
    assert server.sent[big.digest] == big.size + CHUNK
    resumed = [h["range"] for m, p, h in server.log[mark:] if m == "GET" and p.endswith(big.digest)]
    assert resumed and all(int(r.removeprefix("bytes=").split("-")[0]) >= 10 * CHUNK for r in resumed)
    _check_blobs(tmp_path, manifest)


async def test_dropped_connection_is_retried_within_one_pull(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    manifest = Manifest.from_bytes(server.add_model("library/flaky", "latest", config, layers))
    big = manifest.layers[0]
    server.drop_after[big.digest] = [3 * CHUNK + 100]
    client, transport = make_client(tmp_path, server.netloc, concurrency=1)
    try:
        lines = await collect(client.pull("flaky"))
    finally:
        await transport.aclose()
    assert lines[-1] == {"status": "success"}
    assert server.sent[big.digest] == big.size + 100
    _check_blobs(tmp_path, manifest)


async def test_corrupted_blob_is_rejected_and_store_left_clean(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    manifest = Manifest.from_bytes(server.add_model("library/bad", "latest", config, layers))
    big = manifest.layers[0]
    server.corrupt[big.digest] = 5 * CHUNK + 11
    client, transport = make_client(tmp_path, server.netloc)
    try:
        with pytest.raises(IntegrityError, match=f"digest mismatch.*want {big.digest}"):
            await collect(client.pull("bad"))
    finally:
        await transport.aclose()
    files = _store_files(tmp_path)
    assert not any(big.digest.replace(":", "-") in f for f in files)
    assert not any(f.startswith(("manifests/", "partial/", "tmp/")) for f in files)


async def test_cross_host_redirect_is_followed_without_credentials(tmp_path: Path) -> None:
    cdn = await RegistryServer(host="127.0.0.2").start()
    origin = await RegistryServer(redirect_to=cdn, auth=("basic", "alice", "s3cret")).start()
    try:
        config, layers = make_layers()
        manifest = Manifest.from_bytes(origin.add_model("library/moved", "latest", config, layers))
        cdn.blobs.update(origin.blobs)
        client, transport = make_client(tmp_path, origin.netloc)
        try:
            lines = await collect(client.pull("moved", credentials=Credentials("alice", "s3cret")))
        finally:
            await transport.aclose()
    finally:
        await origin.stop()
        await cdn.stop()
    assert lines[-1] == {"status": "success"}
    assert sum(origin.sent.values()) == 0
    assert all(cdn.sent[d] == s for d, s in ((x.digest, x.size) for x in manifest.layers))
    cdn_gets = [h for m, p, h in cdn.log if m == "GET"]
    assert cdn_gets and not any("authorization" in h for h in cdn_gets)
    assert any("authorization" in h for m, p, h in origin.log if "/manifests/" in p)
    _check_blobs(tmp_path, manifest)


async def test_bearer_token_flow(tmp_path: Path) -> None:
    srv = await RegistryServer(auth=("bearer", "bob", "pw")).start()
    try:
        config, layers = make_layers(3 * CHUNK)
        srv.add_model("team/secret", "v2", config, layers)
        client, transport = make_client(tmp_path, srv.netloc)
        try:
            with pytest.raises(Unauthorized):
                await collect(client.pull("team/secret:v2"))
            lines = await collect(client.pull("team/secret:v2", credentials=Credentials("bob", "pw")))
        finally:
            await transport.aclose()
    finally:
        await srv.stop()
    assert lines[-1] == {"status": "success"}
    assert any(p == "/token" for m, p, h in srv.log)


async def test_missing_model_is_not_found(server: RegistryServer, tmp_path: Path) -> None:
    client, transport = make_client(tmp_path, server.netloc)
    try:
        with pytest.raises(NotFound, match="library/nope:latest' not found"):
            await collect(client.pull("nope"))
    finally:
        await transport.aclose()
    assert not (tmp_path / "manifests").exists()


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    mount_tmpfs(disk, 4 << 20)
    try:
        yield disk
    finally:
        unmount(disk)


async def test_a_model_larger_than_the_free_disk_is_refused_before_any_download(
        server: RegistryServer, small_disk: Path) -> None:
    config, layers = make_layers(6 << 20)
    manifest = Manifest.from_bytes(server.add_model("library/huge", "latest", config, layers))
    client, transport = make_client(small_disk, server.netloc)
    try:
        with pytest.raises(StoreError, match="not enough disk space"):
            await collect(client.pull("huge"))
    finally:
        await transport.aclose()
    assert server.sent[manifest.layers[0].digest] == 0  # not one byte was fetched


async def test_a_disk_that_fills_during_a_pull_fails_it_at_once_and_the_pull_resumes_later(
        server: RegistryServer, small_disk: Path) -> None:
    config, layers = make_layers(2 << 20)
    manifest = Manifest.from_bytes(server.add_model("library/mid", "latest", config, layers))
    layer = manifest.layers[0]
    server.before_blob[layer.digest] = lambda: fill(small_disk, leave=10 * CHUNK)
    client, transport = make_client(small_disk, server.netloc, concurrency=1, max_retries=5)
    try:
        with pytest.raises(StoreError, match="no space left"):
            await collect(client.pull("mid"))
    finally:
        await transport.aclose()
    requests = [p for m, p, _ in server.log if m == "GET" and p.endswith(layer.digest)]
    assert len(requests) == 1  # a full disk is not retried
    # With room again, a new pull keeps the chunks written before the disk filled.
    (small_disk / "filler").unlink()
    del server.before_blob[layer.digest]
    sent_before = server.sent[layer.digest]
    client, transport = make_client(small_disk, server.netloc)
    try:
        lines = await collect(client.pull("mid"))
    finally:
        await transport.aclose()
    assert lines[-1] == {"status": "success"}
    first = next(line for line in lines if line.get("digest") == layer.digest)
    assert first.get("completed", 0) > 0
    assert server.sent[layer.digest] - sent_before < layer.size
    _check_blobs(small_disk, manifest)
