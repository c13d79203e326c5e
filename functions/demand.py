"""Replicas that follow demand: where a model that is busy on every holder gets one more copy (pure).

The router calls its :class:`~omx.functions.router.DemandSink` while requests
for a model wait in its holding queue, that is while every holder is at
capacity. :func:`demand_target` then names the node to copy the model to, or
None. A node qualifies when it is alive with known holdings, does not hold the
model's current version yet, holds no ``user`` copy of another version (a
user's model is never overwritten), has the room (free disk within its cache
limit) for what it lacks, and has *no work*: its load report shows no request
running or waiting. Nothing is chosen while a copy of the model is already on
its way to some node (an incoming transfer or a partial blob) or once the model
has ``max_factor`` holders.

Among the nodes that qualify the choice is the best rendezvous rank of
(model, node), the order placement uses: two entry nodes that overflow at the
same time ask the same node, which joins the two requests into one transfer.
The copy is recorded with the ``demand`` origin; placement keeps it while it is
used and drops it ``replication.idle_after`` after its last request, never
below the model's factor (:mod:`omx.storage.placement`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omx.storage.holdings import BlobRef
from omx.storage.placement import DEFAULT_STALL_S, ClusterSnapshot, model_views, rank
from omx.types import BlobDigest, NodeId

__all__ = ["DemandCopy", "demand_target"]


@dataclass(frozen=True)
class DemandCopy:
    """Copy ``name`` at manifest ``digest`` to ``node`` from ``holders`` (``bytes``: what ``node`` lacks)."""

    node: NodeId
    name: str
    key: str
    digest: BlobDigest
    holders: tuple[NodeId, ...]
    bytes: int
    blobs: tuple[BlobRef, ...] = ()


def demand_target(snapshot: ClusterSnapshot, key: str, *, idle: Callable[[NodeId], bool], max_factor: int,
                  now: float, stall_s: float = DEFAULT_STALL_S) -> DemandCopy | None:
    """The copy to add for model ``key`` busy on every holder, or None (see the module docstring)."""
    view = next((v for v in model_views(snapshot, 1, now, stall_s=stall_s) if v.key == key), None)
    if view is None or not view.holders or view.in_progress or len(view.holders) >= max_factor:
        return None
    blocked = set(view.holders) | {n for n, m in view.stale if m.origin == "user"}
    fits: dict[NodeId, int] = {}
    for n in snapshot.alive:
        h = n.holdings
        if h is None or n.node in blocked or not idle(n.node):
            continue
        need = h.missing_bytes(view.blobs)
        if need <= h.room:
            fits[n.node] = need
    ranked = rank(key, fits)
    if not ranked:
        return None
    best = ranked[0]
    return DemandCopy(best, view.name, key, view.digest, view.holders, fits[best], view.blobs)
