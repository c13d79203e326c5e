"""The :class:`~omx.protocols.PeerTransport`: signed GETs to peers' chunk endpoints.

Every request is HMAC-signed as :mod:`omx.mesh.peer_auth` describes (the
cluster's peer key, this node's id). ``resolve`` maps a peer's node id to the
``host:port`` serving its peer endpoints. Over HTTP/1.1 (the default
:class:`~omx.runtime.peer.wire.WireClient`) that is its transfer listener (the
``xf`` Serf tag, see :func:`transfer_address`) or, failing that, its API
address, which serves the same endpoints without zero-copy. Over HTTP/3
(``peer.transport: http3``, an :class:`~omx.runtime.peer.h3.H3PeerClient`) it
is the peer's QUIC listener (:func:`h3_address`), whose Hypercorn serves the
same endpoints. The bytes of each answer are reported to ``on_bytes`` under the
client's transport label.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote

from omx.errors import InvalidRequest, NotFound, OmxError, PeerError
from omx.mesh import NodeTags, sign
from omx.protocols import PeerBlobState
from omx.runtime.peer.wire import WireClient, WireError, WireResponse
from omx.types import BlobDigest, NodeId

__all__ = ["GetClient", "HttpPeerTransport", "h3_address", "transfer_address"]

_MAX_JSON = 64 << 20
_MAX_MANIFEST = 4 << 20


def transfer_address(tags: Mapping[str, str]) -> str | None:
    """Where a member serves its peer endpoints, from its Serf tags: the transfer port, else the API."""
    parsed = NodeTags.from_tags(tags)
    if parsed is None:
        return None
    if parsed.transfer_port is not None:
        return f"{parsed.api.rpartition(':')[0]}:{parsed.transfer_port}"
    return parsed.api


def h3_address(tags: Mapping[str, str]) -> str | None:
    """Where a member serves HTTP/3, from its Serf tags (None when it does not: ``api.http3`` is off there)."""
    parsed = NodeTags.from_tags(tags)
    if parsed is None or parsed.h3_port is None:
        return None
    return f"{parsed.api.rpartition(':')[0]}:{parsed.h3_port}"


class GetClient(Protocol):
    """What the transport sends its GETs with: :class:`WireClient` (HTTP/1.1) or an HTTP/3 client."""

    transport: str
    """``h1`` or ``h3``: the label of its bytes in ``omx_peer_bytes_total``."""

    async def get(self, address: str, target: str, headers: dict[str, str], *, max_body: int,
                  timeout: float,  # noqa: ASYNC109 - a per-request deadline
                  into: bytearray | memoryview | None = None) -> WireResponse:
        ...

    async def aclose(self) -> None:
        ...


def _error_text(response: WireResponse) -> str:
    try:
        doc = json.loads(bytes(response.body))
        return str(doc.get("error")) if isinstance(doc, dict) and doc.get("error") else f"status {response.status}"
    except ValueError:
        return f"status {response.status}"


class HttpPeerTransport:
    """Signed peer requests over pooled keep-alive connections."""

    def __init__(self, node_id: str, key: Callable[[], bytes], resolve: Callable[[NodeId], str | None], *,
                 timeout: float = 60.0, client: GetClient | None = None,
                 on_bytes: Callable[[str, str, int], None] | None = None,
                 fallback: tuple[GetClient, Callable[[NodeId], str | None]] | None = None) -> None:
        self.node_id = node_id
        self._key = key
        self._resolve = resolve
        self._fallback = fallback
        """For a peer ``resolve`` has no address for (HTTP/3 off there): a client and where it answers."""
        self.timeout = timeout
        self.client: GetClient = client or WireClient()
        self._on_bytes = on_bytes

    async def _get(self, peer: NodeId, target: str, *, max_body: int,
                   into: bytearray | memoryview | None = None) -> WireResponse:
        client, address = self.client, self._resolve(peer)
        if address is None and self._fallback is not None:
            client, resolve = self._fallback
            address = resolve(peer)
        if address is None:
            raise PeerError(f"peer {peer} has no known address")
        headers = sign(self._key(), self.node_id, "GET", target)
        try:
            response = await client.get(address, target, headers, max_body=max_body, timeout=self.timeout,
                                        into=into)
        except WireError as exc:
            raise PeerError(f"peer {peer}: {exc}") from exc
        if self._on_bytes is not None:
            self._on_bytes(client.transport, "received", len(response.body))
        if response.status == 200:
            return response
        text = f"peer {peer}: {_error_text(response)}"
        if response.status == 404:
            raise NotFound(text)
        if response.status == 416:
            raise InvalidRequest(text, status=416)
        raise PeerError(text) if response.status >= 500 or response.status == 401 else OmxError(
            text, status=response.status)

    async def blob_state(self, peer: NodeId, digest: BlobDigest) -> PeerBlobState:
        response = await self._get(peer, f"/api/peer/blobs/{digest}/index", max_body=_MAX_JSON)
        try:
            doc: Any = json.loads(bytes(response.body))
            have = doc.get("have")
            index = doc.get("index")
            return PeerBlobState(
                digest=BlobDigest(str(doc["digest"])), size=int(doc["size"]), chunk_size=int(doc["chunk_size"]),
                complete=bool(doc["complete"]), have=base64.b64decode(have) if have else None,
                index_json=json.dumps(index).encode() if index is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PeerError(f"peer {peer} sent a malformed blob state: {exc}") from exc

    async def read_chunks(self, peer: NodeId, digest: BlobDigest, start: int, count: int, length: int, *,
                          into: bytearray | memoryview | None = None) -> bytearray | memoryview:
        target = f"/api/peer/blobs/{digest}/chunks?start={start}&count={count}"
        response = await self._get(peer, target, max_body=length, into=into)
        if len(response.body) != length:
            raise PeerError(f"peer {peer} sent {len(response.body)} bytes for chunks {start}+{count}, "
                            f"expected {length}")
        return response.body

    async def manifest(self, peer: NodeId, name: str) -> bytes:
        response = await self._get(peer, "/api/peer/manifests/" + quote(name, safe="/:"), max_body=_MAX_MANIFEST)
        return bytes(response.body)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._fallback is not None:
            await self._fallback[0].aclose()
