"""The cluster-wide model views (``/api/tags``, ``/v1/models``, ``/api/ps``, ``/api/show``) and delete.

A node answers them for the whole cluster: the models it holds first, then the
models only peers hold (each row as a holder lists it, with ``held_by`` naming
every alive member that holds it), the models loaded on every node (each row
with its ``node``), and ``show`` of a model held elsewhere from a holder. Peers
are asked with signed hop requests, which they answer for themselves only. A
peer's list is cached until its inventory version changes; a peer that does not
answer in time is left out of ``ps`` and described from its inventory in ``tags``.
``delete`` asks every alive peer to delete the model too (each also stops
placing copies of it for a while, so no replica is re-added meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from omx.errors import PeerError
from omx.functions.router import Router
from omx.functions.routing import holders_of
from omx.storage import model_row
from omx.storage.holdings import HeldModel, model_key
from omx.storage.placement import ClusterSnapshot
from omx.types import NodeId

__all__ = ["DELETE_TIMEOUT_S", "VIEW_TIMEOUT_S", "cluster_ps", "delete_elsewhere", "held_by", "holders_by_model",
           "remote_tags", "show_elsewhere"]

VIEW_TIMEOUT_S = 3.0
"""How long a view waits for each peer."""
DELETE_TIMEOUT_S = 30.0
"""How long a delete waits for each peer (it unloads the model there first)."""


def holders_by_model(snapshot: ClusterSnapshot, *, besides: str | None = None) -> dict[str, tuple[NodeId, ...]]:
    """Alive members (but ``besides``) holding each model (by model key), in node id order."""
    held: dict[str, list[NodeId]] = {}
    for view in snapshot.nodes:
        if view.alive and view.holdings is not None and view.node != besides:
            for m in view.holdings.models:
                held.setdefault(m.key, []).append(view.node)
    return {k: tuple(v) for k, v in held.items()}


def _inventory_row(copy: HeldModel) -> dict[str, Any]:
    """A tags row from a peer's inventory alone (when the peer did not answer)."""
    when = datetime.fromtimestamp(copy.modified_at or copy.created_at, UTC)
    return model_row(copy.name, size=copy.size, digest=copy.digest, details=None, modified_at=when)


async def _peer_rows(router: Router, node: NodeId, version: str) -> list[dict[str, Any]] | None:
    cached = router.tags_cache.get(node)
    if cached is not None and cached[0] == version:
        return cached[1]
    try:
        status, doc = await router.peer_json(node, "GET", "/api/tags", within_s=VIEW_TIMEOUT_S)
    except PeerError:
        return None
    if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        return None
    rows = [r for r in doc["models"] if isinstance(r, dict) and isinstance(r.get("name"), str)]
    router.tags_cache[node] = (version, rows)
    return rows


async def remote_tags(router: Router, local_names: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of the models alive peers hold and this node does not, by name, each with ``held_by``.

    This node's store (``local_names``) is the truth about what it holds; its own
    inventory, which lags the store by a rescan, is left out.
    """
    snapshot = router.link.snapshot()
    held = holders_by_model(snapshot, besides=router.node_id)
    missing = set(held) - {model_key(n) for n in local_names}
    if not missing:
        return []
    peers = sorted({n for k in missing for n in held[k]})
    versions = {v.node: v.holdings.version for v in snapshot.nodes if v.holdings is not None}
    answers = await asyncio.gather(*(_peer_rows(router, n, versions.get(n, "")) for n in peers))
    rows: dict[str, dict[str, Any]] = {}
    for rows_of_peer in answers:
        for row in rows_of_peer or ():
            key = model_key(row["name"])
            if key in missing:
                rows.setdefault(key, row)
    for view in snapshot.nodes:  # models whose holders did not answer: described from their inventory
        if view.alive and view.holdings is not None and view.node != router.node_id:
            for m in view.holdings.models:
                if m.key in missing and m.key not in rows:
                    rows[m.key] = _inventory_row(m)
    return [{**rows[k], "status": "ready", "held_by": list(held[k])}
            for k in sorted(missing, key=lambda k: rows[k]["name"])]


def held_by(router: Router, name: str) -> list[str]:
    """Alive members holding ``name`` (this node included when it holds it)."""
    return list(holders_by_model(router.link.snapshot()).get(model_key(name), ()))


async def cluster_ps(router: Router, local_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This node's loaded models, then every alive peer's, each row with its ``node``."""
    rows = [{**r, "node": router.node_id} for r in local_rows]
    peers = [v.node for v in router.link.snapshot().nodes if v.alive and v.node != router.node_id]

    async def of(node: NodeId) -> list[dict[str, Any]]:
        try:
            status, doc = await router.peer_json(node, "GET", "/api/ps", within_s=VIEW_TIMEOUT_S)
        except PeerError:
            return []
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
            return []
        return [{**r, "node": node} for r in doc["models"] if isinstance(r, dict)]

    for peer_rows in await asyncio.gather(*(of(n) for n in peers)):
        rows.extend(peer_rows)
    return rows


async def show_elsewhere(router: Router, name: str, body: bytes) -> dict[str, Any] | None:
    """``/api/show`` of ``name`` answered by an alive holder (None: no holder answered it)."""
    holders = holders_of(router.link.snapshot(), name)
    for node in holders.alive:
        if node == router.node_id:
            continue
        try:
            status, doc = await router.peer_json(node, "POST", "/api/show", body, within_s=VIEW_TIMEOUT_S)
        except PeerError:
            continue
        if status == 200 and isinstance(doc, dict):
            return doc
    return None


async def delete_elsewhere(router: Router, body: bytes) -> tuple[bool, list[str]]:
    """Ask every alive peer to delete the model named in ``body`` (a hop ``/api/delete``).

    Returns whether any peer held it, and a line for each peer that could not be asked or failed.
    """
    peers = [v.node for v in router.link.snapshot().nodes if v.alive and v.node != router.node_id]

    async def one(node: NodeId) -> tuple[bool, str | None]:
        try:
            status, doc = await router.peer_json(node, "DELETE", "/api/delete", body, within_s=DELETE_TIMEOUT_S)
        except PeerError as exc:
            return False, str(exc)
        if status in (200, 404):
            return status == 200, None
        error = doc.get("error") if isinstance(doc, dict) else None
        return False, f"{node} answered {status}: {error or 'no reason given'}"

    results = await asyncio.gather(*(one(n) for n in peers))
    return any(held for held, _ in results), [failure for _, failure in results if failure]
