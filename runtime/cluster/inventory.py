"""Inventories: what this node holds (with a version) and what its peers hold.

:class:`LocalInventory` keeps this node's :class:`~omx.storage.holdings.Holdings`
(models with origins, complete and partial blobs, transfers under way, factor
overrides, free space) up to date: a cheap stat walk of the store
(:meth:`HoldingsScanner.signature <omx.storage.holdings_scan.HoldingsScanner.signature>`),
polled and also poked after create/copy/delete/pull, triggers a rescan in a
thread. The holdings' version is the one gossiped in the ``inv`` tag; it ignores
last-use times and free space, so :meth:`LocalInventory.current` adds those fresh
whenever the holdings are served.

:class:`PeerInventories` fetches a peer's ``/api/peer/inventory`` over HTTP,
HMAC-signed, when the peer's ``inv`` tag differs from the cached version
(and periodically, for its resources and free space), parses its holdings
strictly, and caches the answer. :func:`snapshot_of` turns the members and the
cache into the :class:`~omx.storage.placement.ClusterSnapshot` placement reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from omx.errors import PeerError
from omx.functions.cluster_view import Resources
from omx.mesh import MemberState, sign
from omx.storage import ModelStore
from omx.storage.holdings import Holdings
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.holdings_scan import HoldingsScanner
from omx.storage.holdings_wire import holdings_from_json, holdings_to_json
from omx.storage.placement import ClusterSnapshot, NodeView
from omx.types import NodeId

__all__ = ["PEER_MAX_AGE_S", "PEER_REFRESH_S", "LocalInventory", "PeerInventories", "PeerInventory", "snapshot_of"]

log = logging.getLogger(__name__)

INVENTORY_PATH = "/api/peer/inventory"
MAX_INVENTORY_BYTES = 64 << 20
PEER_REFRESH_S = 10.0
"""How often the node looks its peers' inventories over (:meth:`PeerInventories.due`)."""
PEER_MAX_AGE_S = 300.0
"""A peer's inventory is re-read at least this often; past 30 members, about one per round (see ``due``)."""


class LocalInventory:
    """This node's holdings and their version; :meth:`refresh` after store changes."""

    def __init__(self, store: ModelStore, meta: HoldingsMeta, *, cache_limit: int | None = None) -> None:
        self.store = store
        self.meta = meta
        self.scanner = HoldingsScanner(store, cache_limit=cache_limit)
        self.holdings = Holdings()
        self._signature: str | None = None
        self._poke = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def version(self) -> str:
        """The holdings' version (the ``inv`` tag)."""
        return self.holdings.version

    @property
    def models(self) -> list[dict[str, Any]]:
        """The models held: name, manifest digest and size of each."""
        return [{"name": m.name, "digest": m.digest, "size": m.size} for m in self.holdings.models]

    def to_json(self) -> dict[str, Any]:
        """:meth:`current` holdings as peers read them (``/api/peer/inventory`` adds node id and resources)."""
        return holdings_to_json(self.current())

    def current(self) -> Holdings:
        """The holdings with the latest use times and free space (neither changes the version)."""
        state = self.meta.state()
        models = []
        for m in self.holdings.models:
            rec = state.record_for(m.name, m.digest)
            models.append(replace(m, last_used=rec.last_used) if rec and rec.last_used > m.last_used else m)
        try:
            free = shutil.disk_usage(self.store.root).free
        except OSError:
            free = self.holdings.free_bytes
        return replace(self.holdings, models=tuple(models), free_bytes=free)

    def poke(self) -> None:
        """Ask the poll loop to look now (after a handler changed the store)."""
        self._poke.set()

    async def refresh(self) -> bool:
        """Rescan the store if anything it holds changed; True when the version changed."""
        async with self._lock:
            signature = await asyncio.to_thread(self.scanner.signature)
            if signature == self._signature:
                return False
            holdings = await asyncio.to_thread(self.scanner.scan, self.meta.state())
            self._signature = signature
            changed = holdings.version != self.holdings.version
            self.holdings = holdings
            return changed

    async def watch(self, on_change: Callable[[], Any], poll_s: float = 2.0) -> None:
        """Poll (or wake on :meth:`poke`) forever, calling ``on_change`` after each version change."""
        while True:
            try:
                if await self.refresh():
                    result = on_change()
                    if asyncio.iscoroutine(result):
                        await result
            except Exception:  # noqa: BLE001 - a failed scan is retried on the next tick
                log.exception("inventory refresh failed")
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), poll_s)
            except TimeoutError:
                pass


@dataclass(frozen=True)
class PeerInventory:
    """A peer's last fetched inventory (``error`` set when the last fetch failed).

    ``holdings`` is the last inventory that parsed (kept through a failed fetch);
    ``models`` and ``sizes`` are derived from it for the node records.
    """

    version: str
    models: tuple[str, ...]
    resources: Resources | None
    fetched_at: float
    error: str | None = None
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Bytes of each model held, by name."""
    holdings: Holdings | None = None


def _resources(raw: Any) -> Resources | None:
    if not isinstance(raw, dict):
        return None
    try:
        return Resources(cpu=float(raw["cpu"]), memory=float(raw["memory"]), disk=float(raw["disk"]))
    except (KeyError, TypeError, ValueError):
        return None


class PeerInventories:
    """Cache of peers' inventories, fetched with signed requests."""

    def __init__(self, node_id: str, key: Callable[[], bytes], *, timeout_s: float = 5.0,
                 on_fetch: Callable[[str, int], None] | None = None) -> None:
        self.node_id = node_id
        self._key = key
        self._on_fetch = on_fetch
        """Told ``("inventory", bytes)`` after every answered fetch (the sync-traffic metrics)."""
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self.cache: dict[str, PeerInventory] = {}
        self._inflight: dict[str, asyncio.Task[PeerInventory | None]] = {}

    def get(self, node: str) -> PeerInventory | None:
        return self.cache.get(node)

    def forget(self, node: str) -> None:
        self.cache.pop(node, None)

    def due(self, members: Sequence[MemberState], now: float) -> set[str]:
        """The members whose inventory to re-read whatever their ``inv`` tag says: never fetched, failed last
        time, or older than :data:`PEER_MAX_AGE_S` (stretched so a node re-reads about one per round: resources
        and free space change without changing the version, and re-reading all every round costs O(N²))."""
        oldest = now - max(PEER_MAX_AGE_S, PEER_REFRESH_S * len(members))
        return {m.name for m in members
                if (c := self.cache.get(m.name)) is None or c.error is not None or c.fetched_at < oldest}

    def fetch(self, node: str, api: str) -> asyncio.Task[PeerInventory | None]:
        """Fetch ``node``'s inventory from ``api`` (``ip:port``); one fetch per node at a time."""
        task = self._inflight.get(node)
        if task is None or task.done():
            task = asyncio.create_task(self._fetch(node, api), name=f"inventory-{node}")
            self._inflight[node] = task
        return task

    async def _fetch(self, node: str, api: str) -> PeerInventory | None:
        headers = sign(self._key(), self.node_id, "GET", INVENTORY_PATH)
        previous = self.cache.get(node)
        try:
            body = await self._get_json(f"http://{api}{INVENTORY_PATH}", headers)
            holdings = holdings_from_json(body)
            version = body.get("version")
            if not isinstance(version, str) or not 0 < len(version) <= 64:
                raise PeerError("peer inventory has no valid version")
            inv = PeerInventory(version=version, models=tuple(m.name for m in holdings.models),
                                resources=_resources(body.get("resources")), fetched_at=time.time(),
                                sizes={m.name: m.size for m in holdings.models}, holdings=holdings)
        except (httpx.HTTPError, ValueError, PeerError) as exc:
            log.info("inventory of %s at %s not fetched: %s", node, api, exc)
            inv = PeerInventory(version=previous.version if previous else "", models=previous.models
                                if previous else (), resources=None, fetched_at=time.time(), error=str(exc),
                                sizes=previous.sizes if previous else {},
                                holdings=previous.holdings if previous else None)
        self.cache[node] = inv
        return inv

    async def _get_json(self, url: str, headers: Mapping[str, str]) -> Any:
        body = bytearray()
        async with self._client.stream("GET", url, headers=headers) as response:
            response.raise_for_status()
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) > MAX_INVENTORY_BYTES:
                    raise PeerError(f"peer inventory is larger than {MAX_INVENTORY_BYTES} bytes")
        if self._on_fetch is not None:
            self._on_fetch("inventory", len(body))
        return json.loads(body)

    async def aclose(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self._client.aclose()


def snapshot_of(self_id: str, self_holdings: Holdings, members: Iterable[MemberState],
                peers: Mapping[str, PeerInventory]) -> ClusterSnapshot:
    """This node (alive, ``self_holdings``) plus every other member with its last parsed holdings.

    A member counts as alive only in Serf's ``alive`` state; a peer whose
    inventory never parsed has holdings ``None`` (placement neither counts it nor
    places on it).
    """
    nodes = {self_id: NodeView(NodeId(self_id), True, self_holdings)}
    for state in members:
        if state.name not in nodes:
            inv = peers.get(state.name)
            nodes[state.name] = NodeView(NodeId(state.name), state.status == "alive",
                                         inv.holdings if inv is not None else None)
    return ClusterSnapshot.of(nodes.values())
