"""Which models a node evicts to stay under ``models.max_cache_size`` (``models.auto_cleanup``). Pure.

Rules, for the node ``node`` of a :class:`~omx.storage.placement.ClusterSnapshot`:

* only ``replica``/``demand`` copies are evicted: a copy a user put on the node
  stays (the same promise placement keeps); read-only copies (an extra root)
  cannot be removed and are never chosen; nor are the models in ``keep`` (the
  caller passes the loaded ones, and those a transfer or migration is using);
* least recently used first (``last_used``, then name), and only while the
  store's usage (:attr:`~omx.storage.holdings.Holdings.used_bytes`) is above
  ``max_cache_size``; a model whose blobs are all shared with models that stay
  frees nothing and is skipped;
* only where another alive node holds the same version complete, **and** that
  copy is sure to stay: when no other holder has it as a ``user`` copy, one
  holder is its *keeper* (the best rendezvous-ranked holder that is within its
  own cache limit, else the best ranked) and the keeper never evicts it. Every
  node computes the same keeper from the same snapshot, so two nodes under
  pressure never both evict the last two copies.
"""

from __future__ import annotations

from collections.abc import Iterable

from omx.types import BlobDigest, NodeId

from .holdings import HeldModel, Holdings, model_key
from .placement import ClusterSnapshot, rank

__all__ = ["evictions", "keeper"]


def _over_limit(h: Holdings) -> bool:
    return h.cache_limit is not None and h.used_bytes > h.cache_limit


def keeper(snapshot: ClusterSnapshot, model: HeldModel) -> NodeId | None:
    """The alive holder of ``model`` (same version) that keeps it whatever its cache pressure; None if none."""
    holders = {n.node: n.holdings for n in snapshot.alive
               if n.holdings is not None and (m := n.holdings.model(model.name)) is not None
               and m.digest == model.digest}
    ranked = rank(model.key, holders)
    if not ranked:
        return None
    for node in ranked:
        h = holders[node]
        if h is not None and not _over_limit(h):
            return node
    return ranked[0]


def _safe_elsewhere(snapshot: ClusterSnapshot, node: NodeId, model: HeldModel) -> bool:
    others = [m for n in snapshot.alive if n.node != node and n.holdings is not None
              and (m := n.holdings.model(model.name)) is not None and m.digest == model.digest]
    if not others:
        return False
    if any(m.origin == "user" for m in others):
        return True
    return keeper(snapshot, model) != node


def evictions(
    snapshot: ClusterSnapshot, node: NodeId, max_cache_size: int, *, keep: Iterable[str] = (),
) -> tuple[HeldModel, ...]:
    """The models ``node`` should delete, in order, to get under ``max_cache_size`` (rules above)."""
    view = snapshot.get(node)
    if view is None or view.holdings is None:
        return ()
    local = view.holdings
    used = local.used_bytes
    if used <= max_cache_size:
        return ()
    kept = {model_key(k) for k in keep}
    own = {b.digest: b.size for b in local.blobs if not b.read_only}
    remaining = list(local.models)
    chosen: list[HeldModel] = []
    candidates = sorted((m for m in local.models if m.origin != "user" and not m.read_only and m.key not in kept),
                        key=lambda m: (m.last_used, m.key))
    for m in candidates:
        if used <= max_cache_size:
            break
        others = [r for r in remaining if r is not m]
        still_needed: set[BlobDigest] = {b.digest for r in others for b in r.blobs}
        freed = sum(own.get(b.digest, 0) for b in m.blobs if b.digest not in still_needed)
        if freed == 0 or not _safe_elsewhere(snapshot, node, m):
            continue
        chosen.append(m)
        remaining = others
        used -= freed
    return tuple(chosen)
