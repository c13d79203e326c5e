"""In-memory clusters for the placement tests: holdings built from a few words."""

from __future__ import annotations

from collections.abc import Iterable

from omx.storage.holdings import (
    BlobHolding,
    BlobRef,
    FactorOverride,
    HeldModel,
    Holdings,
    Incoming,
    Origin,
    PartialHolding,
)
from omx.storage.placement import ClusterSnapshot, NodeView, Plan
from omx.types import BlobDigest, NodeId

GB = 10**9
CHUNK = 1 << 20


def digest(n: int | str) -> BlobDigest:
    """A distinct, valid sha256 digest per ``n``."""
    text = str(n).encode().hex()
    return BlobDigest("sha256:" + text.rjust(64, "0")[-64:])


def model(name: str, version: int = 1, *, size: int = GB, origin: Origin = "user", created_at: float | None = None,
          last_used: float = 0.0, shared: Iterable[BlobRef] = (), read_only: bool = False) -> HeldModel:
    """A model of two blobs (a small config and its weights) plus any ``shared`` ones."""
    name = name if ":" in name else name + ":latest"
    blobs = (BlobRef(digest(f"cfg-{name}-{version}"), 100), BlobRef(digest(f"w-{name}-{version}"), size),
             *shared)
    return HeldModel(name=name, digest=digest(f"manifest-{name}-{version}"), size=sum(b.size for b in blobs),
                     blobs=blobs, origin=origin, created_at=float(version) if created_at is None else created_at,
                     last_used=last_used, read_only=read_only)


def partial_of(ref: BlobRef, held: Iterable[int] = ()) -> PartialHolding:
    count = -(-ref.size // CHUNK)
    have = bytearray(-(-count // 8))
    for i in held:
        if i < count:
            have[i >> 3] |= 1 << (i & 7)
    return PartialHolding(ref.digest, ref.size, CHUNK, bytes(have))


def holdings(*models: HeldModel, free: int = 100 * GB, partials: Iterable[PartialHolding] = (),
             incoming: Iterable[Incoming] = (), factors: Iterable[FactorOverride] = (),
             cache_limit: int | None = None) -> Holdings:
    """What a node holding ``models`` (and so their blobs) has."""
    blobs = {b.digest: BlobHolding(b.digest, b.size, CHUNK, None, read_only=m.read_only)
             for m in models for b in m.blobs}
    return Holdings.of(models=models, blobs=blobs.values(), partials=partials, incoming=incoming,
                       factors=factors, free_bytes=free, cache_limit=cache_limit)


def cluster(nodes: dict[str, Holdings | None], dead: Iterable[str] = ()) -> ClusterSnapshot:
    down = set(dead)
    return ClusterSnapshot.of(NodeView(NodeId(n), n not in down, h) for n, h in nodes.items())


def apply(snapshot: ClusterSnapshot, p: Plan) -> ClusterSnapshot:
    """The cluster after every action of ``p`` completed (adds become replicas, drops vanish)."""
    views = {v.key: v for v in p.views}
    nodes = []
    for n in snapshot.nodes:
        h = n.holdings
        if h is None or not n.alive:
            nodes.append(n)
            continue
        models = {m.key: m for m in h.models}
        blobs = {b.digest: b for b in h.blobs}
        free = h.free_bytes
        for a in p.adds:
            if a.node != n.node:
                continue
            v = views[a.key]
            inc = h.incoming_for(a.key)
            models[a.key] = HeldModel(v.name, v.digest, v.size, v.blobs, inc.origin if inc else "replica",
                                      created_at=_created(snapshot, v.key, v.digest))
            for b in v.blobs:
                blobs.setdefault(b.digest, BlobHolding(b.digest, b.size, CHUNK, None))
            free -= a.bytes
        for a in p.drops:
            if a.node == n.node:
                models.pop(a.key, None)
        added = {b.digest for a in p.adds if a.node == n.node for b in views[a.key].blobs}
        nodes.append(NodeView(n.node, True, Holdings.of(
            models=models.values(), blobs=blobs.values(), partials=[x for x in h.partials if x.digest not in added],
            incoming=[i for i in h.incoming if i.key not in {a.key for a in p.adds if a.node == n.node}],
            factors=h.factors, free_bytes=free, cache_limit=h.cache_limit)))
    return ClusterSnapshot.of(nodes)


def _created(snapshot: ClusterSnapshot, key: str, digest: BlobDigest) -> float:
    for n in snapshot.nodes:
        m = n.holdings.model(key) if n.holdings is not None else None
        if m is not None and m.digest == digest:
            return m.created_at
    raise AssertionError(f"no copy of {key} at {digest}")
