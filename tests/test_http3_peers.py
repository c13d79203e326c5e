"""Peer traffic over HTTP/3: two real nodes with ``peer.transport: http3`` (real Serf, QUIC, inference).

One module cluster (``replication.factor`` 1, 1 MiB chunks) where A holds a generated llama of a
few MiB. B answers a generate for it by forwarding to A over QUIC, word for word what A answers;
then B pulls the model from A (chunk transfer, BLAKE3 per chunk) over QUIC. ``omx_peer_bytes_total``
proves which transport carried the bytes. The tests run in order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_TEMPLATE
from tests.support.cluster import Cluster, ClusterNode, metric, start_cluster
from tests.support.node import create_model, wait_until
from tests.support.tiny_gguf import write_tiny_llama
from tests.support.transfer import sha256_of

pytestmark = [pytest.mark.serf, pytest.mark.e2e, pytest.mark.timeout(240)]

ENV = {"OMX_PEER__TRANSPORT": "http3", "OMX_MODELS__CHUNK_SIZE": "1MiB", "OMX_MODELS__REGISTRY": "127.0.0.1:9"}
MODEL = "h3-tiny:latest"
PARAMS = {"temperature": 0, "seed": 42, "num_ctx": 256}
DEADLINE = 60.0


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A few MiB: several chunks to transfer, still quick to run.
    return write_tiny_llama(tmp_path_factory.mktemp("h3-gguf") / "h3.gguf", seed=5, n_embd=256, n_ff=512,
                            n_layer=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, gguf: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("h3-peers"), 2, env=ENV)
    try:
        a, b = c.nodes
        with a.client() as client:
            create_model(client, MODEL, gguf, template=TINY_TEMPLATE, parameters=PARAMS)
        wait_until(lambda: a.node_id in held_by(b).get(MODEL, []), timeout=DEADLINE,
                   what="B to list the model as held by A")
        yield c
    finally:
        c.close()


def held_by(node: ClusterNode) -> dict[str, list[str]]:
    return {m["name"]: m.get("held_by", []) for m in node.get("/api/tags")["models"]}


def peer_bytes(node: ClusterNode, transport: str, direction: str) -> float:
    return metric(node, "omx_peer_bytes_total", transport=transport, direction=direction)


def generate(node: ClusterNode, stream: bool) -> tuple[httpx.Response, list[dict[str, Any]]]:
    body = {"model": MODEL, "prompt": "the cat sat", "stream": stream, "options": {"num_predict": 12}}
    with httpx.stream("POST", node.url + "/api/generate", json=body, timeout=60) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    return r, lines


def test_a_generate_is_forwarded_over_quic_and_answers_as_the_holder_does(cluster: Cluster) -> None:
    a, b = cluster.nodes
    sent, received = peer_bytes(b, "h3", "sent"), peer_bytes(b, "h3", "received")
    for stream in (False, True):
        direct, want = generate(a, stream)
        routed, got = generate(b, stream)
        assert direct.status_code == routed.status_code == 200
        assert routed.headers["x-omx-node"] == a.node_id
        text = "".join(line["response"] for line in got)
        assert text and text == "".join(line["response"] for line in want)
        assert len(got) == len(want)
    assert peer_bytes(b, "h3", "sent") > sent
    assert peer_bytes(b, "h3", "received") > received
    assert peer_bytes(b, "h1", "sent") == peer_bytes(b, "h1", "received") == 0


def test_a_pull_takes_the_chunks_over_quic(cluster: Cluster, gguf: Path) -> None:
    a, b = cluster.nodes
    before = peer_bytes(b, "h3", "received")
    with b.client() as client, client.stream("POST", "/api/pull", json={"model": MODEL}) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1] == {"status": "success"}, lines
    assert any("peers" in str(line.get("status")) for line in lines)
    digest = sha256_of(gguf)
    blob = b.home / "data" / "models" / "blobs" / digest.replace(":", "-")
    assert sha256_of(blob) == digest
    assert peer_bytes(b, "h3", "received") - before >= gguf.stat().st_size
    assert peer_bytes(b, "h1", "received") == 0
    assert metric(b, "omx_replication_bytes_received_total", source="peer") >= gguf.stat().st_size
    assert metric(b, "omx_replication_chunks_rejected_total") == 0
    # B now answers from its own copy, as A does.
    _, mine = generate(b, False)
    _, theirs = generate(a, False)
    assert mine[0]["response"] == theirs[0]["response"]


def test_a_client_opening_many_streams_and_reading_none_leaves_the_node_serving(cluster: Cluster) -> None:
    a, _ = cluster.nodes
    asyncio.run(_hog_streams(a, 300))
    r = httpx.get(a.url + "/api/version", timeout=10)
    assert r.status_code == 200


async def _hog_streams(node: ClusterNode, streams: int) -> None:
    """Send ``streams`` requests on one QUIC connection with receive windows too small to take the
    answers, and read nothing; meanwhile another connection must be served. (aioquic lets a peer have
    128 streams open at once and raises the limit only as streams end.)"""
    from aioquic.asyncio.client import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent

    from omx.runtime.peer.h3 import H3PeerClient

    class Hog(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            pass  # reads nothing

    port = node.info["h3_port"]
    ca = node.home / "tls" / "ca.crt"
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=node.host,
                               max_stream_data=64, max_data=4096)  # no answer fits: none ends
    config.load_verify_locations(cafile=str(ca))
    async with connect(node.host, port, configuration=config, create_protocol=Hog) as hog:
        h3 = H3Connection(hog._quic)
        for _ in range(streams):
            h3.send_headers(hog._quic.get_next_available_stream_id(),
                            [(b":method", b"GET"), (b":scheme", b"https"),
                             (b":authority", f"{node.host}:{port}".encode()), (b":path", b"/api/version")],
                            end_stream=True)
        hog.transmit()
        other = H3PeerClient(ca, connect_timeout=30)
        try:
            response = await other.get(f"{node.host}:{port}", "/api/version", {}, max_body=1 << 20, timeout=30)
            assert response.status == 200 and json.loads(bytes(response.body))["version"]
        finally:
            await other.aclose()


def test_a_peer_with_http3_off_is_reached_over_http1(cluster: Cluster, tmp_path: Path) -> None:
    b = cluster.nodes[1]
    c = cluster.add_node("C", env={**ENV, "OMX_PEER__TRANSPORT": "http1", "OMX_API__HTTP3": "false"})
    gguf = write_tiny_llama(tmp_path / "c.gguf", seed=6, n_embd=256, n_ff=512, n_layer=2)  # no chunk B holds
    with c.client() as client:
        create_model(client, "c-only", gguf, template=TINY_TEMPLATE, parameters=PARAMS)
    wait_until(lambda: c.node_id in held_by(b).get("c-only:latest", []), timeout=DEADLINE,
               what="B to list the model as held by C")
    sent = peer_bytes(b, "h1", "sent")
    body = {"model": "c-only", "prompt": "the cat sat", "stream": False, "options": {"num_predict": 4}}
    routed = httpx.post(b.url + "/api/generate", json=body, timeout=60)
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-omx-node"] == c.node_id and routed.json()["done"] is True
    assert peer_bytes(b, "h1", "sent") > sent  # C has no HTTP/3 listener: B asked it over HTTP/1.1
    received = peer_bytes(b, "h1", "received")
    with b.client() as client, client.stream("POST", "/api/pull", json={"model": "c-only"}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1] == {"status": "success"}, lines
    assert peer_bytes(b, "h1", "received") - received >= gguf.stat().st_size
