"""``omx_peer_bytes_total``: the HTTP/1.1 peer clients count what they send and receive, labelled ``h1``.

(The HTTP/3 side is counted end to end in tests/test_http3_peers.py.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from omx.runtime.cluster.metrics import NodeMetrics
from omx.runtime.cluster.peer_link import HttpPeerLink
from omx.runtime.peer import HttpPeerTransport
from omx.storage.placement import ClusterSnapshot
from omx.types import BlobDigest, NodeId

Counted = list[tuple[str, str, int]]


async def answer(body: bytes, requests: list[bytes]) -> tuple[asyncio.Server, str]:
    """A server answering every request with ``body``; each request's body is kept in ``requests``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                requests.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"


def snapshot() -> ClusterSnapshot:
    raise AssertionError("not used")


async def test_a_forwarded_call_counts_its_request_body_sent_and_its_answer_received() -> None:
    requests: list[bytes] = []
    srv, address = await answer(b'{"response":"hi"}', requests)
    counted: Counted = []
    link = HttpPeerLink("omx-me", lambda: b"k" * 32, {"omx-peer": address}.get, snapshot,
                        on_bytes=lambda *sample: counted.append(sample))
    try:
        reply = await link.request(NodeId("omx-peer"), "POST", "/api/generate", {}, b'{"model":"m"}')
        assert [piece async for piece in reply.chunks()] == [b'{"response":"hi"}']
    finally:
        await link.aclose()
        srv.close()
    assert requests == [b'{"model":"m"}']
    assert counted == [("h1", "sent", 13), ("h1", "received", 17)]


async def test_a_chunk_fetch_counts_the_bytes_received() -> None:
    srv, address = await answer(b"x" * 1000, [])
    counted: Counted = []
    transport = HttpPeerTransport("omx-me", lambda: b"k" * 32, {"omx-peer": address}.get,
                                  on_bytes=lambda *sample: counted.append(sample))
    try:
        body = await transport.read_chunks(NodeId("omx-peer"), BlobDigest("sha256:" + "0" * 64), 0, 1, 1000)
        assert bytes(body) == b"x" * 1000
    finally:
        await transport.aclose()
        srv.close()
    assert counted == [("h1", "received", 1000)]


def test_the_metric_has_every_transport_and_direction_from_the_start(tmp_path: Path) -> None:
    metrics = NodeMetrics(tmp_path)
    metrics.peer_traffic("h3", "received", 4096)
    metrics.peer_traffic("h1", "sent", 0)
    samples = {(s.labels["transport"], s.labels["direction"]): s.value
               for family in text_string_to_metric_families(metrics.render()[0].decode())
               for s in family.samples if s.name == "omx_peer_bytes_total"}
    assert samples == {("h1", "sent"): 0, ("h1", "received"): 0, ("h3", "sent"): 0, ("h3", "received"): 4096}
