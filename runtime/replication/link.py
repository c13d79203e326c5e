"""What the replicator needs of the rest of the node, and signed commands to peers.

:class:`ClusterLink` is the replicator's window on the cluster service (the
snapshot placement runs on, fresh inventories, member names). :class:`PeerCommands`
sends the few replication commands one node gives another over the peer API
(HMAC-signed like every peer request): fetch a model and stream progress, drop a
copy after a migration, reconcile now.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx

from omx.errors import NotFound, OmxError, PeerError
from omx.functions.cluster_view import NodeRecord
from omx.mesh import sign
from omx.storage.placement import ClusterSnapshot
from omx.types import NodeId

__all__ = ["FETCH_PATH", "DROP_PATH", "KICK_PATH", "ClusterLink", "PeerCommands"]

FETCH_PATH = "/api/peer/replication/fetch"
DROP_PATH = "/api/peer/replication/drop"
KICK_PATH = "/api/peer/replication/kick"


class ClusterLink(Protocol):
    """The cluster service as the replicator sees it."""

    node_id: str

    def cluster_snapshot(self) -> ClusterSnapshot:
        ...

    def members(self) -> list[NodeRecord]:
        ...

    async def publish_inventory(self) -> None:
        """Rescan this node's store now and gossip the new inventory version if it changed."""
        ...

    async def refresh_peer(self, node: str) -> None:
        """Fetch ``node``'s inventory now (whatever its version tag says)."""
        ...

    def api_of(self, node: str) -> str | None:
        """``host:port`` of an alive member's API."""
        ...


class PeerCommands:
    """Signed replication commands to peers' APIs."""

    def __init__(self, node_id: str, key: Callable[[], bytes], api_of: Callable[[str], str | None]) -> None:
        self.node_id = node_id
        self._key = key
        self._api_of = api_of
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))

    def _url(self, node: NodeId, path: str) -> str:
        api = self._api_of(node)
        if api is None:
            raise PeerError(f"node {node} is not reachable (not an alive member)")
        return f"http://{api}{path}"

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {**sign(self._key(), self.node_id, method, path, body), "Content-Type": "application/json"}

    async def post(self, node: NodeId, path: str, doc: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(doc).encode()
        try:
            response = await self._client.post(self._url(node, path), content=body,
                                               headers=self._headers("POST", path, body))
            data = response.json() if response.content else {}
        except (httpx.HTTPError, ValueError) as exc:
            raise PeerError(f"{path} on {node} failed: {exc or type(exc).__name__}") from exc
        if response.status_code == 404:
            raise NotFound(str(data.get("error", "not found")))
        if response.is_error:
            raise PeerError(f"{node}: {data.get('error', response.status_code)}")
        return dict(data)

    async def stream(self, node: NodeId, path: str, doc: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST ``doc`` and yield the NDJSON objects of the answer; an ``error`` object raises."""
        body = json.dumps(doc).encode()
        try:
            async with self._client.stream("POST", self._url(node, path), content=body,
                                           headers=self._headers("POST", path, body)) as response:
                if response.is_error:
                    raw = await response.aread()
                    try:
                        message = json.loads(raw).get("error", response.status_code)
                    except ValueError:
                        message = response.status_code
                    raise PeerError(f"{node}: {message}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if isinstance(item, dict) and item.get("error"):
                        raise PeerError(f"{node}: {item['error']}")
                    yield item
        except (httpx.HTTPError, ValueError) as exc:
            raise PeerError(f"{path} on {node} failed: {exc or type(exc).__name__}") from exc
        except OmxError:
            raise

    async def aclose(self) -> None:
        await self._client.aclose()
