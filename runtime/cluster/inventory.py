"""Inventories: what this node holds (with a version) and what its peers hold.

:class:`LocalInventory` recomputes this node's model list when the store's
manifests change (a cheap stat walk of the manifest trees, polled and also
poked after create/copy/delete/pull) and derives a short version string from
the (name, manifest digest) pairs: the version gossiped in the ``inv`` tag.

:class:`PeerInventories` fetches a peer's ``/api/peer/inventory`` over HTTP,
HMAC-signed, when the peer's ``inv`` tag differs from the cached version
(and periodically, for its resources), and caches the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from omx.functions.cluster_view import Resources
from omx.mesh import sign
from omx.storage import ModelStore
from omx.timefmt import iso_time

__all__ = ["LocalInventory", "PeerInventories", "PeerInventory", "inventory_version"]

log = logging.getLogger(__name__)

INVENTORY_PATH = "/api/peer/inventory"


def inventory_version(pairs: list[tuple[str, str]]) -> str:
    """A 16-hex version of a set of (model name, manifest digest) pairs; ``0`` when empty."""
    if not pairs:
        return "0"
    h = hashlib.sha256()
    for name, digest in sorted(pairs):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def _manifest_signature(roots: tuple[Path, ...]) -> str:
    """A digest of every manifest file's path, size and mtime (blocking; a handful of stats)."""
    h = hashlib.sha256()
    for root in roots:
        base = root / "manifests"
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class LocalInventory:
    """This node's models and their version; :meth:`refresh` after store changes."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.version = "0"
        self.models: list[dict[str, Any]] = []
        self._signature: str | None = None
        self._poke = asyncio.Event()
        self._lock = asyncio.Lock()

    def poke(self) -> None:
        """Ask the poll loop to look now (after a handler changed the store)."""
        self._poke.set()

    async def refresh(self) -> bool:
        """Re-read the store if its manifests changed; True when the version changed."""
        async with self._lock:
            roots = (self.store.root, *self.store.extra_roots)
            signature = await asyncio.to_thread(_manifest_signature, roots)
            if signature == self._signature:
                return False
            entries = await self.store.list_models()
            self._signature = signature
            self.models = [{"name": e.name, "digest": e.digest, "size": e.size,
                            "modified_at": iso_time(e.modified_at)} for e in entries]
            version = inventory_version([(e.name, e.digest) for e in entries])
            changed, self.version = version != self.version, version
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
    """A peer's last fetched inventory (``error`` set when the last fetch failed)."""

    version: str
    models: tuple[str, ...]
    resources: Resources | None
    fetched_at: float
    error: str | None = None
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Bytes of each model held, by name."""


def _resources(raw: Any) -> Resources | None:
    if not isinstance(raw, dict):
        return None
    try:
        return Resources(cpu=float(raw["cpu"]), memory=float(raw["memory"]), disk=float(raw["disk"]))
    except (KeyError, TypeError, ValueError):
        return None


class PeerInventories:
    """Cache of peers' inventories, fetched with signed requests."""

    def __init__(self, node_id: str, key: Callable[[], bytes], *, timeout_s: float = 5.0) -> None:
        self.node_id = node_id
        self._key = key
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self.cache: dict[str, PeerInventory] = {}
        self._inflight: dict[str, asyncio.Task[PeerInventory | None]] = {}

    def get(self, node: str) -> PeerInventory | None:
        return self.cache.get(node)

    def forget(self, node: str) -> None:
        self.cache.pop(node, None)

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
            response = await self._client.get(f"http://{api}{INVENTORY_PATH}", headers=headers)
            response.raise_for_status()
            body = response.json()
            rows = body.get("models", [])
            models = tuple(str(m["name"]) for m in rows)
            sizes = {str(m["name"]): int(m.get("size") or 0) for m in rows}
            inv = PeerInventory(version=str(body.get("version", "0")), models=models,
                                resources=_resources(body.get("resources")), fetched_at=time.time(), sizes=sizes)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.info("inventory of %s at %s not fetched: %s", node, api, exc)
            inv = PeerInventory(version=previous.version if previous else "", models=previous.models
                                if previous else (), resources=None, fetched_at=time.time(), error=str(exc),
                                sizes=previous.sizes if previous else {})
        self.cache[node] = inv
        return inv

    async def aclose(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self._client.aclose()
