"""The router's :class:`~omx.functions.router.PeerLink`: signed hop requests to peers' APIs.

Forwarded calls and the cluster-wide views go to a member's API address (its
``api`` Serf tag) on pooled keep-alive HTTP/1.1 connections
(:class:`~omx.runtime.cluster.peer_http.PeerHttp`), signed as every peer
request is (:func:`omx.mesh.sign`: method, path with query, body digest; the
secret never travels). Response bodies come as the peer sent them, so a relayed
stream is the peer's bytes exactly. Transport failures become
:class:`~omx.errors.PeerError`, which is what the router retries on.

Requests with bodies up to :data:`FAST_MAX_BODY` (load polls, forwarded
calls, the views) go to the member's transfer listener when ``fast_of`` names
one (:class:`~omx.runtime.peer.server.PeerServer`, which serves hop requests
with less added latency than Hypercorn); larger ones go to its API.

With ``peer.transport: http3`` the same requests go over QUIC to each
member's HTTP/3 listener (``address_of`` then names it, ``client`` is an
:class:`~omx.runtime.peer.h3.H3PeerClient`); a member with HTTP/3 off is
asked over HTTP/1.1 instead (``fallback``). Request bodies sent and answers
received are reported to ``on_bytes`` under the client's transport label.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

from omx.errors import PeerError
from omx.functions.routing import NodeLoad, load_from_json
from omx.mesh import sign
from omx.runtime.cluster.peer_http import PeerHttp, PeerHttpError
from omx.runtime.peer.wire import WireError
from omx.storage.placement import ClusterSnapshot
from omx.types import NodeId

__all__ = ["CONNECT_TIMEOUT_S", "FAST_MAX_BODY", "FIRST_BYTE_TIMEOUT_S", "LOAD_PATH", "SNAPSHOT_TTL_S",
           "HttpPeerLink"]

LOAD_PATH = "/api/peer/load"
CONNECT_TIMEOUT_S = 3.0
FIRST_BYTE_TIMEOUT_S = 300.0
"""How long a forwarded call may wait for its peer's answer to start (a non-streamed one: to end)."""
LOAD_TIMEOUT_S = 2.0
SNAPSHOT_TTL_S = 0.05
"""How long a cluster snapshot serves routing and the views (membership and inventories change far slower)."""
FAST_MAX_BODY = 1 << 20
"""The largest request body sent to a transfer listener (its ``max_body``)."""
_MAX_LOAD = 1 << 20


_BROKEN = (PeerHttpError, WireError)
"""What the HTTP/1.1 and HTTP/3 peer clients raise when a request fails on the wire."""


class PeerResponse(Protocol):
    status: int
    headers: dict[str, str]

    def chunks(self) -> AsyncIterator[bytes]:
        ...

    async def aclose(self) -> None:
        ...


class PeerClient(Protocol):
    """:class:`~omx.runtime.cluster.peer_http.PeerHttp` or :class:`~omx.runtime.peer.h3.H3PeerClient`."""

    transport: str

    async def request(self, address: str, method: str, target: str, headers: Mapping[str, str], body: bytes, *,
                      head_timeout: float, read_timeout: float | None = None) -> PeerResponse:
        ...

    async def aclose(self) -> None:
        ...


def _broken(node: str, exc: BaseException) -> PeerError:
    return PeerError(f"peer {node}: {exc or type(exc).__name__}")


class _Reply:
    """A peer's answer whose body is still arriving (:class:`~omx.functions.router.PeerReply`)."""

    def __init__(self, node: str, response: PeerResponse, on_bytes: Callable[[int], None] | None) -> None:
        self.node = node
        self._response = response
        self._on_bytes = on_bytes
        self.status = response.status
        self.headers = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._response.chunks():
                if self._on_bytes is not None:
                    self._on_bytes(len(piece))
                yield piece
        except _BROKEN as exc:
            raise _broken(self.node, exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpPeerLink:
    """Signed requests to alive members' APIs; ``api_of`` maps a node id to ``host:port`` (None: not alive)."""

    def __init__(self, node_id: str, key: Callable[[], bytes], api_of: Callable[[str], str | None],
                 snapshot: Callable[[], ClusterSnapshot], *, client: PeerClient | None = None,
                 on_bytes: Callable[[str, str, int], None] | None = None,
                 on_sync: Callable[[str, int], None] | None = None,
                 fast_of: Callable[[str], str | None] | None = None,
                 fallback: tuple[PeerClient, Callable[[str], str | None], Callable[[str], str | None]] | None = None
                 ) -> None:
        self.node_id = node_id
        self._fallback = fallback
        """For a member ``api_of`` has no address for (HTTP/3 off there): a client, its ``api_of`` and
        ``fast_of``."""
        self._fast_of = fast_of
        """A member's transfer listener (None: use ``api_of``), for requests with small bodies."""
        self.on_sync = on_sync
        """Told ``(kind, bytes)`` after each answered load poll and function-table pull (sync metrics)."""
        self._key = key
        self._api_of = api_of
        self._snapshot = snapshot
        self._snap: ClusterSnapshot | None = None
        self._snap_at = 0.0
        self._client: PeerClient = client or PeerHttp(connect_timeout=CONNECT_TIMEOUT_S)
        self._on_bytes = on_bytes

    def snapshot(self) -> ClusterSnapshot:
        """The cluster as the last :data:`SNAPSHOT_TTL_S` saw it (taking one costs ~0.1 ms; each routed call
        asks for it)."""
        now = time.monotonic()
        if self._snap is None or now - self._snap_at >= SNAPSHOT_TTL_S:
            self._snap, self._snap_at = self._snapshot(), now
        return self._snap

    def _route(self, node: NodeId, body_size: int = 0) -> tuple[PeerClient, str]:
        """The client and address a request to ``node`` goes to (HTTP/1.1 for a peer without HTTP/3)."""
        client, api, fast_of = self._client, self._api_of(node), self._fast_of
        if api is None and self._fallback is not None:
            client, api_of, fast_of = self._fallback
            api = api_of(node)
        if api is None:
            raise PeerError(f"peer {node} is not an alive member")
        if fast_of is not None and body_size <= FAST_MAX_BODY:
            return client, fast_of(node) or api
        return client, api

    async def request(self, node: NodeId, method: str, path: str, headers: Mapping[str, str], body: bytes, *,
                      head_timeout_s: float | None = None) -> _Reply:
        """Send a signed request and return once the response head arrived; raises PeerError."""
        signed = {**headers, **sign(self._key(), self.node_id, method, path, body)}
        client, address = self._route(node, len(body))
        try:
            response = await client.request(
                address, method, path, signed, body,
                head_timeout=FIRST_BYTE_TIMEOUT_S if head_timeout_s is None else head_timeout_s)
        except _BROKEN as exc:
            raise _broken(node, exc) from exc
        counted = None
        if self._on_bytes is not None:
            on_bytes, transport = self._on_bytes, client.transport
            on_bytes(transport, "sent", len(body))

            def counted(n: int) -> None:
                on_bytes(transport, "received", n)
        return _Reply(node, response, counted)

    async def load(self, node: NodeId) -> NodeLoad:
        """``node``'s load report; raises PeerError (unreachable, refused) or ValueError (malformed)."""
        reply = await self.request(node, "GET", LOAD_PATH, {}, b"", head_timeout_s=LOAD_TIMEOUT_S)
        try:
            body = bytearray()
            async for piece in reply.chunks():
                body += piece
                if len(body) > _MAX_LOAD:
                    raise PeerError(f"peer {node}: load report too large")
        finally:
            await reply.aclose()
        if reply.status != 200:
            raise PeerError(f"peer {node} answered {LOAD_PATH} with status {reply.status}")
        if self.on_sync is not None:
            self.on_sync("load", len(body))
        return load_from_json(json.loads(body))

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._fallback is not None:
            await self._fallback[0].aclose()
