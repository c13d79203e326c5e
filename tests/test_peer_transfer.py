"""Chunk transfer in one process: real stores, the real adapter and transfer listener, real sockets.

Each "peer" is a :class:`~tests.support.transfer.PeerHarness` (a store served on
127.0.0.1 by the transfer listener, HMAC auth included); the receiver is the
real :class:`BlobTransfer` / :class:`Transfers` with the real HTTP transport.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from omx.errors import NotFound
from omx.mesh import sign
from omx.runtime.peer import (
    BlobTransfer,
    TransferFailed,
    TransferProgress,
    Transfers,
    TransferSettings,
    fetch_model,
    probe_sources,
)
from omx.runtime.peer.frontier import Sha256Frontier
from omx.storage import ChunkIndex, Layer, Manifest, ModelName, ModelStore, PartialBlob
from omx.storage.damaged import is_damaged, mark_damaged
from omx.storage.fetch_plan import ALL
from omx.storage.registry import RegistryClient
from omx.types import BlobDigest, NodeId
from tests.support.registry_fixtures import collect, make_client, make_layers
from tests.support.registry_server import RegistryServer
from tests.support.transfer import KEY, PeerHarness, peer_harness, transport_for

CHUNK = 64 * 1024


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _put(store: ModelStore, data: bytes) -> ChunkIndex:
    info = store.blobs.write_bytes(data)
    assert info.index is not None
    return info.index


async def settled(predicate: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Wait until ``predicate`` holds: a server counts bytes once its send returns, which may be
    a moment after the client has read them."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _get(peer: PeerHarness, target: str) -> httpx.Response:
    headers = sign(KEY, "omx-tester", "GET", target)
    return httpx.get(f"http://{peer.address}{target}", headers=headers, timeout=10)


class Counts:
    """A TransferObserver that records what the metrics would."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.rejected = 0
        self.active = 0
        self.max_active = 0

    def bytes_received(self, source: str, n: int) -> None:
        self.received[source] = self.received.get(source, 0) + n

    def chunk_rejected(self, source: str) -> None:
        self.rejected += 1

    def transfer_started(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    def transfer_finished(self) -> None:
        self.active -= 1


# ------------------------------------------------------------------ serving


async def test_peer_endpoints_answer_index_chunks_and_manifest(tmp_path: Path) -> None:
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        data = _blob(1, 5 * CHUNK + 123)
        idx = _put(a.store, data)
        config = a.store.blobs.write_bytes(b'{"model_format":"gguf"}')
        manifest = Manifest(Layer("application/vnd.docker.container.image.v1+json", config.digest, config.size),
                            (Layer("application/vnd.ollama.image.model", idx.blob, idx.size),))
        name = ModelName.parse("tiny:1")
        a.store.write_manifest(name, manifest)

        doc = await asyncio.to_thread(lambda: _get(a, f"/api/peer/blobs/{idx.blob}/index").json())
        assert doc["complete"] is True and doc["have"] is None and doc["chunks_held"] == 6
        assert ChunkIndex.from_json(json.dumps(doc["index"])) == idx

        r = await asyncio.to_thread(_get, a, f"/api/peer/blobs/{idx.blob}/chunks?start=1&count=2")
        assert r.status_code == 200 and r.content == data[CHUNK:3 * CHUNK]
        assert r.headers["x-omx-chunk-start"] == "1" and r.headers["content-type"] == "application/octet-stream"
        last = await asyncio.to_thread(_get, a, f"/api/peer/blobs/{idx.blob}/chunks?start=5")
        assert last.content == data[5 * CHUNK:]
        await settled(lambda: a.served.total == 2 * CHUNK + 123, "the served bytes")

        m = await asyncio.to_thread(_get, a, "/api/peer/manifests/registry.ollama.ai/library/tiny:1")
        assert m.status_code == 200 and Manifest.from_bytes(m.content) == manifest
        assert m.headers["x-omx-manifest-digest"].startswith("sha256:")


@pytest.mark.parametrize(("target", "status"), [
    ("/api/peer/blobs/sha256:{missing}/index", 404),
    ("/api/peer/blobs/sha256:{missing}/chunks?start=0", 404),
    ("/api/peer/blobs/nothex/index", 400),
    ("/api/peer/blobs/{digest}/chunks", 400),
    ("/api/peer/blobs/{digest}/chunks?start=-1", 400),
    ("/api/peer/blobs/{digest}/chunks?start=x", 400),
    ("/api/peer/blobs/{digest}/chunks?start=0&count=0", 400),
    ("/api/peer/blobs/{digest}/chunks?start=0&count=99999", 400),
    ("/api/peer/blobs/{digest}/chunks?start=3", 416),
    ("/api/peer/blobs/{digest}/chunks?start=2&count=2", 416),
    ("/api/peer/manifests/no/such:model", 404),
    ("/api/peer/manifests/a/b/c/d/e", 400),
    ("/api/peer/manifests/a..b", 400),
])
async def test_peer_endpoints_refuse_bad_requests_with_an_error(tmp_path: Path, target: str, status: int) -> None:
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, _blob(2, 3 * CHUNK))
        target = target.format(digest=idx.blob, missing="0" * 64)
        r = await asyncio.to_thread(_get, a, target)
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text


async def test_peer_endpoints_need_a_signature_and_serve_peer_paths_only(tmp_path: Path) -> None:
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, _blob(3, CHUNK))
        url = f"http://{a.address}/api/peer/blobs/{idx.blob}/index"
        unsigned = await asyncio.to_thread(httpx.get, url)
        assert unsigned.status_code == 401 and "error" in unsigned.json()
        other = await asyncio.to_thread(httpx.get, f"http://{a.address}/api/tags")
        assert other.status_code == 404 and "peers only" in other.json()["error"]


async def test_a_damaged_blob_is_never_served(tmp_path: Path) -> None:
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, _blob(4, 2 * CHUNK))
        mark_damaged(a.store.blobs, idx.blob, "verify found chunk 1 bad", [1])
        for target in (f"/api/peer/blobs/{idx.blob}/index", f"/api/peer/blobs/{idx.blob}/chunks?start=0"):
            r = await asyncio.to_thread(_get, a, target)
            assert r.status_code == 404 and "damaged" in r.json()["error"]
        assert a.served.total == 0


async def test_a_partial_blob_serves_only_the_chunks_it_holds(tmp_path: Path) -> None:
    async with peer_harness(tmp_path / "src", "omx-src") as src, peer_harness(tmp_path / "a", "omx-a") as a:
        data = _blob(5, 4 * CHUNK)
        idx = _put(src.store, data)
        part = PartialBlob.open(a.store.blobs, idx.blob, idx.size, index=idx)
        part.write_chunk(2, data[2 * CHUNK:3 * CHUNK])
        doc = (await asyncio.to_thread(_get, a, f"/api/peer/blobs/{idx.blob}/index")).json()
        assert doc["complete"] is False and doc["chunks_held"] == 1
        assert base64.b64decode(doc["have"]) == bytes([0b100])
        ok = await asyncio.to_thread(_get, a, f"/api/peer/blobs/{idx.blob}/chunks?start=2")
        assert ok.content == data[2 * CHUNK:3 * CHUNK]
        held_not = await asyncio.to_thread(_get, a, f"/api/peer/blobs/{idx.blob}/chunks?start=1")
        assert held_not.status_code == 416


async def test_file_ranges_also_go_through_hypercorns_path_in_pieces(tmp_path: Path) -> None:
    """The same handler served without zero-copy send (the API port's path): identical bytes."""
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        data = _blob(6, 40 * CHUNK + 7)  # > 1 MiB: several body pieces
        idx = _put(a.store, data)
        target = f"/api/peer/blobs/{idx.blob}/chunks?start=0&count=41"
        transport = httpx.ASGITransport(app=a.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            r = await client.get(target, headers=sign(KEY, "omx-tester", "GET", target))
        assert r.status_code == 200 and r.content == data
        await settled(lambda: a.served.total == len(data), "the served bytes")


# ------------------------------------------------------------------ fetching


async def test_a_blob_comes_from_two_peers_verified_and_identical(tmp_path: Path) -> None:
    data = _blob(7, 23 * CHUNK + 5)
    async with peer_harness(tmp_path / "a", "omx-a") as a, peer_harness(tmp_path / "c", "omx-c") as c:
        idx = _put(a.store, data)
        _put(c.store, data)
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        transport = transport_for([a, c])
        counts = Counts()
        seen: list[TransferProgress] = []
        try:
            index, sources = await probe_sources(transport, idx.blob, idx.size, [NodeId("omx-a"), NodeId("omx-c")])
            assert index == idx and sources == {"omx-a": ALL, "omx-c": ALL}
            transfer = BlobTransfer(receiver.blobs, idx, transport, sources, observer=counts,
                                    settings=TransferSettings(concurrency=4), on_progress=seen.append)
            info = await transfer.run()
        finally:
            await transport.aclose()
        assert info.created and receiver.blobs.path(idx.blob).read_bytes() == data
        assert receiver.blobs.stored_index(idx.blob) == idx
        await settled(lambda: a.served.total + c.served.total == len(data), "the served bytes")
        assert a.served.total > 0 and c.served.total > 0  # both sources were used
        assert counts.received == {"peer": len(data)} and counts.rejected == 0 and counts.active == 0
        assert seen[-1].state == "completed" and seen[-1].bytes_done == seen[-1].bytes_total == len(data)
        assert not (tmp_path / "b" / "partial").exists() or not any((tmp_path / "b" / "partial").iterdir())


async def test_a_corrupt_copy_is_detected_counted_and_replaced_from_another_peer(tmp_path: Path) -> None:
    data = _blob(8, 12 * CHUNK)
    async with peer_harness(tmp_path / "a", "omx-a") as a, peer_harness(tmp_path / "c", "omx-c") as c:
        idx = _put(a.store, data)
        _put(c.store, data)
        flip_byte(a.store.blobs.path(idx.blob), 4 * CHUNK + 10)  # chunk 4 of A's copy rots on disk
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        transport = transport_for([a, c])
        counts = Counts()
        try:
            # A is asked first for everything it can take: chunk 4 comes from A at least once.
            transfer = BlobTransfer(receiver.blobs, idx, transport, {NodeId("omx-a"): ALL, NodeId("omx-c"): ALL},
                                    observer=counts, settings=TransferSettings(concurrency=12))
            await transfer.run()
        finally:
            await transport.aclose()
        assert receiver.blobs.path(idx.blob).read_bytes() == data
        assert counts.rejected == 1 and transfer.progress.rejected == 1
        assert transfer.plan.sources["omx-a"].bad == 1


async def test_a_transfer_resumes_without_refetching_held_chunks(tmp_path: Path) -> None:
    data = _blob(9, 10 * CHUNK + 99)
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, data)
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        part = PartialBlob.open(receiver.blobs, idx.blob, idx.size, index=idx)
        held = {0, 3, 4, 9}
        for i in held:  # what a killed transfer left on disk
            off, length = idx.chunk_range(i)
            part.write_chunk(i, data[off:off + length])
        transport = transport_for([a])
        try:
            await BlobTransfer(receiver.blobs, idx, transport, {NodeId("omx-a"): ALL}).run()
        finally:
            await transport.aclose()
        assert receiver.blobs.path(idx.blob).read_bytes() == data
        await settled(lambda: a.served.total == len(data) - len(held) * CHUNK, "the served bytes")


async def test_chunks_held_in_other_local_blobs_are_copied_not_fetched(tmp_path: Path) -> None:
    base = _blob(10, 8 * CHUNK)
    changed = bytearray(base)
    changed[2 * CHUNK + 5] ^= 1  # differs from a held blob in one chunk only
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, bytes(changed))
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        _put(receiver, base)
        transport = transport_for([a])
        counts = Counts()
        transfers = Transfers(receiver.blobs, transport, observer=counts)
        try:
            await transfers.fetch_from_peers(idx.blob, idx.size, [NodeId("omx-a")])
        finally:
            await transport.aclose()
        assert receiver.blobs.path(idx.blob).read_bytes() == bytes(changed)
        await settled(lambda: a.served.total == CHUNK, "the served bytes")
        assert counts.received == {"local": 7 * CHUNK, "peer": CHUNK}


async def test_a_swarm_peer_serves_what_it_holds_and_the_rest_comes_from_the_seed(tmp_path: Path) -> None:
    data = _blob(11, 16 * CHUNK)
    async with peer_harness(tmp_path / "a", "omx-a") as a, peer_harness(tmp_path / "s", "omx-s") as s:
        idx = _put(a.store, data)
        part = PartialBlob.open(s.store.blobs, idx.blob, idx.size, index=idx)
        for i in range(8, 16):  # the swarm peer is half way through the same blob
            off, length = idx.chunk_range(i)
            part.write_chunk(i, data[off:off + length])
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        transport = transport_for([a, s])
        try:
            index, sources = await probe_sources(transport, idx.blob, idx.size, [NodeId("omx-s"), NodeId("omx-a")])
            assert index == idx and sources[NodeId("omx-s")] == frozenset(range(8, 16))
            await Transfers(receiver.blobs, transport, settings=TransferSettings(concurrency=4)).fetch_blob(
                idx, sources)
        finally:
            await transport.aclose()
        assert receiver.blobs.path(idx.blob).read_bytes() == data
        await settled(lambda: s.served.total + a.served.total == len(data), "the served bytes")
        assert s.served.total > 0


class _DeadLinkTo:
    """The real transport, except that chunk reads from ``peer`` never return (its link died mid-way)."""

    def __init__(self, inner: Any, peer: str) -> None:
        self.inner, self.peer = inner, peer

    async def blob_state(self, peer: NodeId, digest: BlobDigest) -> Any:
        return await self.inner.blob_state(peer, digest)

    async def read_chunks(self, peer: NodeId, digest: BlobDigest, start: int, count: int, length: int, *,
                          into: Any = None) -> Any:
        if peer == self.peer:
            await asyncio.Event().wait()
        return await self.inner.read_chunks(peer, digest, start, count, length, into=into)

    async def manifest(self, peer: NodeId, name: str) -> bytes:
        return bytes(await self.inner.manifest(peer, name))


async def test_a_swarm_peer_is_asked_again_during_the_transfer_and_its_new_chunks_are_used(tmp_path: Path) -> None:
    data = _blob(15, 8 * CHUNK)
    async with peer_harness(tmp_path / "a", "omx-a") as a, peer_harness(tmp_path / "s", "omx-s") as s:
        idx = _put(a.store, data)
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        real = transport_for([a, s])
        transfers = Transfers(receiver.blobs, _DeadLinkTo(real, "omx-a"),  # type: ignore[arg-type]
                              settings=TransferSettings(concurrency=2, stall_timeout=0.1))
        try:
            fetching = asyncio.create_task(transfers.fetch_from_peers(
                idx.blob, idx.size, [NodeId("omx-a"), NodeId("omx-s")], watch_s=0.02, spread=(0, 2)))

            def asking_the_seed() -> bool:
                transfer = transfers.get(idx.blob)
                return transfer is not None and bool(transfer.plan.running)

            await settled(asking_the_seed, "the transfer to ask the seed")
            transfer = transfers.get(idx.blob)
            assert transfer is not None and NodeId("omx-s") not in transfer.plan.sources  # s had nothing yet
            part = PartialBlob.open(s.store.blobs, idx.blob, idx.size, index=idx)
            for i in range(idx.chunk_count):  # meanwhile the swarm peer gets the chunks (from elsewhere)
                off, length = idx.chunk_range(i)
                part.write_chunk(i, data[off:off + length])
            # Only the swarm peer can deliver now: the transfer must have asked it again.
            await asyncio.wait_for(fetching, 30)
        finally:
            await real.aclose()
        assert receiver.blobs.path(idx.blob).read_bytes() == data
        await settled(lambda: s.served.total == len(data), "the served bytes")
        assert a.served.total == 0


async def test_a_transfer_with_chunks_nobody_has_fails_clearly_and_keeps_what_it_got(tmp_path: Path) -> None:
    data = _blob(12, 6 * CHUNK)
    async with peer_harness(tmp_path / "src", "omx-src") as src, peer_harness(tmp_path / "s", "omx-s") as s:
        idx = _put(src.store, data)
        part = PartialBlob.open(s.store.blobs, idx.blob, idx.size, index=idx)
        for i in (0, 1, 2):
            part.write_chunk(i, data[i * CHUNK:(i + 1) * CHUNK])
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        transport = transport_for([s])
        try:
            with pytest.raises(TransferFailed, match="3 chunk"):
                await BlobTransfer(receiver.blobs, idx, transport, {NodeId("omx-s"): {0, 1, 2}}).run()
        finally:
            await transport.aclose()
        assert not receiver.blobs.has(idx.blob)
        assert PartialBlob.open(receiver.blobs, idx.blob, idx.size, index=idx).held() == [0, 1, 2]


async def test_an_unreachable_peer_is_dropped_and_the_other_delivers(tmp_path: Path) -> None:
    data = _blob(13, 6 * CHUNK)
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, data)
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        transport = transport_for([a])
        gone = NodeId("omx-gone")  # no address: every request to it fails at once
        settings = TransferSettings(concurrency=2, backoff=0.01, max_backoff=0.02, max_failures=2)
        try:
            transfer = BlobTransfer(receiver.blobs, idx, transport, {gone: ALL, NodeId("omx-a"): ALL},
                                    settings=settings)
            await transfer.run()
        finally:
            await transport.aclose()
        assert receiver.blobs.path(idx.blob).read_bytes() == data
        state = transfer.plan.sources[gone]
        assert state.delivered == 0 and state.failures >= 1  # tried, failed, rested (or dropped): never blocked


async def test_one_transfer_per_blob_and_a_whole_model_from_its_holders(tmp_path: Path) -> None:
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        weights = _put(a.store, _blob(14, 9 * CHUNK + 1))
        config = a.store.blobs.write_bytes(b'{"model_format":"gguf","model_family":"llama"}')
        template = a.store.blobs.write_bytes(b"{{ .Prompt }}")
        manifest = Manifest(Layer("application/vnd.docker.container.image.v1+json", config.digest, config.size),
                            (Layer("application/vnd.ollama.image.model", weights.blob, weights.size),
                             Layer("application/vnd.ollama.image.template", template.digest, template.size)))
        name = ModelName.parse("swarm/tiny:q4")
        digest = a.store.write_manifest(name, manifest)
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        transport = transport_for([a])
        transfers = Transfers(receiver.blobs, transport)
        layers: set[BlobDigest] = set()
        try:
            both = await asyncio.gather(transfers.fetch_from_peers(weights.blob, weights.size, [NodeId("omx-a")]),
                                        transfers.fetch_from_peers(weights.blob, weights.size, [NodeId("omx-a")]))
            assert {b.path for b in both} == {receiver.blobs.path(weights.blob)}
            # The second caller joined the first transfer: the blob was served once.
            await settled(lambda: a.served.total == weights.size, "the served bytes")
            with pytest.raises(NotFound):
                await fetch_model(receiver, transfers, "no/such:model", [NodeId("omx-a")])
            fetched = await fetch_model(receiver, transfers, name, [NodeId("omx-a")], expected_digest=digest,
                                        on_progress=lambda layer, _p: layers.add(layer.digest))
        finally:
            await transport.aclose()
        total = weights.size + config.size + template.size  # each blob served exactly once
        await settled(lambda: a.served.total == total, "the served bytes")
        assert a.served.responses == weights.chunk_count + 2
        assert fetched.digest == digest and set(fetched.fetched) == {config.digest, template.digest}
        assert layers == {config.digest, template.digest}
        assert receiver.resolve_sync(name).manifest_digest == digest
        assert transfers.active() == []


async def test_a_fresh_copy_clears_an_old_damage_marker(tmp_path: Path) -> None:
    data = _blob(15, 2 * CHUNK)
    async with peer_harness(tmp_path / "a", "omx-a") as a:
        idx = _put(a.store, data)
        receiver = ModelStore(tmp_path / "b", chunk_size=CHUNK)
        mark_damaged(receiver.blobs, idx.blob, "an earlier copy rotted")
        transport = transport_for([a])
        try:
            await BlobTransfer(receiver.blobs, idx, transport, {NodeId("omx-a"): ALL}).run()
        finally:
            await transport.aclose()
        assert not is_damaged(receiver.blobs, idx.blob)



@pytest.mark.parametrize("keep", [0, CHUNK, 64 * CHUNK])
async def test_the_sha256_frontier_hashes_out_of_order_chunks_in_order(tmp_path: Path, keep: int) -> None:
    """Chunks kept in memory, read back when too far ahead, or held from an earlier run: one digest."""
    data = _blob(16, 7 * CHUNK + 3)
    source = ModelStore(tmp_path / "src", chunk_size=CHUNK)
    idx = _put(source, data)
    blobs = ModelStore(tmp_path / "b", chunk_size=CHUNK).blobs
    part = PartialBlob.open(blobs, idx.blob, idx.size, index=idx)
    part.write_chunk(1, data[CHUNK:2 * CHUNK])  # held from an earlier run
    frontier = Sha256Frontier(part, keep_bytes=keep)
    released: list[int] = []
    try:
        frontier.offer(-1)
        for i in (6, 3, 0, 7, 2, 5, 4):
            off, length = idx.chunk_range(i)
            chunk = data[off:off + length]
            part.write_chunk(i, chunk, durable=False)
            frontier.offer(i, chunk, lambda i=i: released.append(i))
        info = await frontier.finish(idx)
    finally:
        frontier.close()
    assert info.path.read_bytes() == data and sorted(released) == [0, 2, 3, 4, 5, 6, 7]


async def test_registry_pulls_report_the_bytes_they_receive(tmp_path: Path) -> None:
    """``omx_replication_bytes_received_total{source="registry"}`` is fed by the registry client's byte hook."""
    server = await RegistryServer().start()
    config, layers = make_layers()
    server.add_model("library/tiny", "latest", config, layers)
    client, transport = make_client(tmp_path, server.netloc)
    counts = Counts()
    hooked = RegistryClient(client.blobs, transport, client.options, on_bytes=lambda n: counts.bytes_received(
        "registry", n))
    try:
        await collect(hooked.pull("tiny"))
    finally:
        await transport.aclose()
        await server.stop()
    assert counts.received == {"registry": len(config) + sum(len(b) for _, b in layers)}
