"""Placement: which nodes should hold which models. Pure: no I/O, no clock (``now`` is an input).

Every node runs :func:`plan` on the same :class:`ClusterSnapshot` (the alive members
and their :class:`~omx.storage.holdings.Holdings`) and gets the same answer, so no
leader is needed; each node then carries out the actions that name itself.

**Models and versions.** A model is a name (compared case-insensitively); its
current version is the manifest digest with the newest ``created_at`` (ties: the
larger digest) among the copies on alive nodes, or among all known copies when no
alive node has one. Copies of other versions are *stale*.

**Rules** (for each model, in the order of its key; factor = the newest override
known to any node, else ``default_factor``):

* *holders* are the alive nodes with the current version complete; a node is *in
  progress* when it is not a holder and has a partial blob of the model, or an
  :class:`~omx.storage.holdings.Incoming` entry for the current version updated
  within ``stall_s`` of ``now``;
* under-replicated (holders < factor) and at least one alive holder to copy from:
  in-progress nodes are resumed first, then new nodes are added, each in
  rendezvous order (highest random weight of (model, node) first), until holders +
  resumed + added reach the factor or no node is left. A node qualifies when its
  room (free space, bounded by its cache limit, less what this plan already put
  there) covers what it lacks of the model. Nodes holding a stale ``user`` copy
  never qualify (a user's model is never overwritten); a stale replica is
  upgraded in place. With factor > alive nodes, every alive node that qualifies
  gets a copy;
* over-replicated (holders > factor): ``replica``/``demand`` copies are dropped,
  ``demand`` copies first, then lowest rendezvous rank first, until holders =
  factor; ``user`` copies never are. A ``demand`` copy (one the router added for
  load) used within ``idle_after`` of ``now`` is *in use*: it is neither dropped
  nor counted as surplus, so it stays beside the factor's copies while requests
  come and goes ``idle_after`` after the last one. What remains are holders
  with the model complete, at least ``factor`` >= 1 of them, so the last copy
  is never dropped;
* stale ``replica``/``demand`` copies are dropped once the current version has
  min(factor, alive nodes) holders, unless the plan upgrades them.

:class:`Constraints` carries what the replicator is doing that placement must
respect: copies to ``keep`` (never dropped: a migration's target), copies to
``avoid`` (never added; only what every node knows may go here, since each node
carries out its own adds alone), ``leaving`` copies (a migration's source while it runs: not
counted as holders, neither dropped nor re-added) and ``avoid_nodes``.

Safety when views differ: drops follow the rendezvous rank, so two nodes that see
the same holders drop the same copies; a node only carries out its own drops, and
the replicator re-checks a drop against a fresh snapshot before deleting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from omx.types import BlobDigest, NodeId

from .holdings import BlobRef, FactorOverride, HeldModel, Holdings, Origin, factor_overrides, model_key

__all__ = [
    "DEFAULT_IDLE_AFTER_S",
    "DEFAULT_STALL_S",
    "NO_CONSTRAINTS",
    "Action",
    "ClusterSnapshot",
    "Constraints",
    "ModelView",
    "NodeView",
    "Plan",
    "factor_for",
    "in_use",
    "model_views",
    "plan",
    "rank",
    "rendezvous_score",
]

DEFAULT_STALL_S = 600.0
"""An incoming transfer with no progress for this long no longer counts as in progress."""
DEFAULT_IDLE_AFTER_S = 600.0
"""A ``demand`` copy without a request for this long may be dropped (``replication.idle_after``)."""


# ================================================================ inputs


@dataclass(frozen=True)
class NodeView:
    """One member as the snapshot's taker sees it; ``holdings`` None until its inventory was fetched."""

    node: NodeId
    alive: bool
    holdings: Holdings | None


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every known member (alive or not) with its last known holdings. Build with :meth:`of`."""

    nodes: tuple[NodeView, ...] = ()

    @classmethod
    def of(cls, nodes: Iterable[NodeView]) -> ClusterSnapshot:
        """A snapshot in canonical (node id) order; the input order does not matter."""
        ordered = tuple(sorted(nodes, key=lambda n: n.node))
        if len({n.node for n in ordered}) != len(ordered):
            raise ValueError("a node appears twice in the snapshot")
        return cls(ordered)

    @property
    def alive(self) -> tuple[NodeView, ...]:
        """Alive members whose holdings are known: the only ones placement acts on."""
        return tuple(n for n in self.nodes if n.alive and n.holdings is not None)

    def get(self, node: NodeId) -> NodeView | None:
        for n in self.nodes:
            if n.node == node:
                return n
        return None

    def factors(self) -> dict[str, FactorOverride]:
        """The winning factor override per model key, over every known node (alive or not)."""
        return factor_overrides(n.holdings for n in self.nodes if n.holdings is not None)


@dataclass(frozen=True)
class Constraints:
    """What the replicator is doing that a plan must not undo (pairs are (model key, node))."""

    keep: frozenset[tuple[str, NodeId]] = frozenset()
    avoid: frozenset[tuple[str, NodeId]] = frozenset()
    leaving: frozenset[tuple[str, NodeId]] = frozenset()
    avoid_nodes: frozenset[NodeId] = frozenset()

    def may_add(self, key: str, node: NodeId) -> bool:
        return node not in self.avoid_nodes and (key, node) not in self.avoid and (key, node) not in self.leaving

    def may_drop(self, key: str, node: NodeId) -> bool:
        return (key, node) not in self.keep and (key, node) not in self.leaving


NO_CONSTRAINTS = Constraints()


# ================================================================ rendezvous


def rendezvous_score(key: str, node: NodeId) -> int:
    """The weight of ``node`` for model ``key``: a stable 64-bit hash of the pair."""
    digest = hashlib.blake2b(f"{key}\0{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, nodes: Iterable[NodeId]) -> tuple[NodeId, ...]:
    """``nodes`` best first for model ``key`` (highest score; node id breaks the unlikely tie)."""
    return tuple(sorted(set(nodes), key=lambda n: (-rendezvous_score(key, n), n)))


def factor_for(name: str, overrides: Mapping[str, FactorOverride], default_factor: int) -> int:
    """A model's factor: its override (``overrides`` by model key) when one is set, else the default."""
    o = overrides.get(model_key(name))
    return o.factor if o is not None and o.factor is not None else default_factor


# ================================================================ per-model view


@dataclass(frozen=True)
class ModelView:
    """One model across the cluster, as placement and status see it.

    ``holders`` (alive, current version complete) and ``in_progress`` are in
    rendezvous order; ``last_used`` is each holder's last request there;
    ``offline_holders`` are known but not alive members holding
    it; ``stale`` lists (node, copy) for alive nodes holding another version;
    ``alive_nodes`` counts the alive members with known holdings.
    """

    key: str
    name: str
    digest: BlobDigest
    size: int
    blobs: tuple[BlobRef, ...]
    factor: int
    holders: tuple[NodeId, ...]
    origins: Mapping[NodeId, Origin]
    in_progress: tuple[NodeId, ...]
    offline_holders: tuple[NodeId, ...]
    stale: tuple[tuple[NodeId, HeldModel], ...]
    alive_nodes: int
    last_used: Mapping[NodeId, float] = field(default_factory=dict)

    @property
    def target(self) -> int:
        """Holders needed to be ready: the factor, or every alive node when there are fewer."""
        return min(self.factor, self.alive_nodes)


def _newest(copies: Iterable[HeldModel]) -> HeldModel:
    return max(copies, key=lambda m: (m.created_at, m.digest, m.name))


def model_views(
    snapshot: ClusterSnapshot, default_factor: int, now: float, *,
    constraints: Constraints = NO_CONSTRAINTS, stall_s: float = DEFAULT_STALL_S,
) -> tuple[ModelView, ...]:
    """A :class:`ModelView` of every model any known node holds, in key order."""
    if default_factor < 1:
        raise ValueError("the replication factor must be at least 1")
    overrides = snapshot.factors()
    alive = snapshot.alive
    alive_count = sum(1 for n in snapshot.nodes if n.alive)
    copies: dict[str, list[tuple[NodeView, HeldModel]]] = {}
    for n in snapshot.nodes:
        if n.holdings is not None:
            for m in n.holdings.models:
                copies.setdefault(m.key, []).append((n, m))
    views = []
    for key in sorted(copies):
        everyone = copies[key]
        on_alive = [m for n, m in everyone if n.alive]
        current = _newest(on_alive or [m for _, m in everyone])
        digests = {b.digest for b in current.blobs}
        holders: list[NodeId] = []
        origins: dict[NodeId, Origin] = {}
        used: dict[NodeId, float] = {}
        stale: list[tuple[NodeId, HeldModel]] = []
        offline: list[NodeId] = []
        for n, m in everyone:
            if m.digest != current.digest:
                if n.alive:
                    stale.append((n.node, m))
            elif not n.alive:
                offline.append(n.node)
            elif (key, n.node) not in constraints.leaving:
                holders.append(n.node)
                origins[n.node] = m.origin
                used[n.node] = m.last_used
        held = set(holders) | {n for n, _ in stale if (key, n) in constraints.leaving}
        progressing = []
        for n in alive:
            h = n.holdings
            assert h is not None
            if n.node in held or (key, n.node) in constraints.leaving:
                continue
            inc = h.incoming_for(key)
            fresh = inc is not None and inc.digest == current.digest and now - inc.updated_at <= stall_s
            if fresh or any(h.partial(d) is not None for d in digests):
                progressing.append(n.node)
        views.append(ModelView(
            key=key, name=current.name, digest=current.digest, size=current.size, blobs=current.blobs,
            factor=factor_for(key, overrides, default_factor), holders=rank(key, holders), origins=origins,
            in_progress=rank(key, progressing), offline_holders=tuple(sorted(offline)),
            stale=tuple(sorted(stale, key=lambda s: s[0])), alive_nodes=alive_count, last_used=used,
        ))
    return tuple(views)


# ================================================================ the plan


Reason = Literal["under_replicated", "resume", "over_replicated", "superseded"]


@dataclass(frozen=True)
class Action:
    """Add (fetch) or drop one copy of a model on one node.

    ``bytes`` is what the node still has to fetch (add) or the model's size (drop).
    ``reason``: ``under_replicated`` (a new copy), ``resume`` (a transfer the node
    already started), ``over_replicated`` (a surplus replica) or ``superseded``
    (a replica of an older version).
    """

    kind: Literal["add", "drop"]
    model: str
    key: str
    digest: BlobDigest
    node: NodeId
    bytes: int
    reason: Reason

    def to_json(self) -> dict[str, Any]:
        return {"action": self.kind, "model": self.model, "digest": self.digest, "node": self.node,
                "bytes": self.bytes, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """The copies to add and to drop across the cluster, in model key order."""

    adds: tuple[Action, ...] = ()
    drops: tuple[Action, ...] = ()
    views: tuple[ModelView, ...] = field(default=(), compare=False, repr=False)

    def for_node(self, node: NodeId) -> Plan:
        """Only the actions ``node`` carries out itself."""
        return Plan(tuple(a for a in self.adds if a.node == node), tuple(a for a in self.drops if a.node == node),
                    self.views)

    @property
    def empty(self) -> bool:
        return not self.adds and not self.drops

    def to_json(self) -> list[dict[str, Any]]:
        """Adds then drops, for ``POST /api/distributed/rebalance``'s ``plan``."""
        return [a.to_json() for a in (*self.adds, *self.drops)]


class _Room:
    """Room per node as the plan fills it (blobs already planned for a node are not counted twice)."""

    def __init__(self, alive: Iterable[NodeView]) -> None:
        self.holdings = {n.node: n.holdings for n in alive if n.holdings is not None}
        self.left = {node: h.room for node, h in self.holdings.items()}
        self.planned: dict[NodeId, set[BlobDigest]] = {node: set() for node in self.holdings}

    def need(self, node: NodeId, blobs: tuple[BlobRef, ...]) -> int:
        pending = [b for b in blobs if b.digest not in self.planned[node]]
        return self.holdings[node].missing_bytes(pending)

    def take(self, node: NodeId, blobs: tuple[BlobRef, ...]) -> int | None:
        """Reserve room for ``blobs`` on ``node``: the bytes it must fetch, or None when they do not fit."""
        need = self.need(node, blobs)
        if need > self.left[node]:
            return None
        self.left[node] -= need
        self.planned[node].update(b.digest for b in blobs)
        return need


def plan(
    snapshot: ClusterSnapshot, default_factor: int, now: float, *,
    constraints: Constraints = NO_CONSTRAINTS, stall_s: float = DEFAULT_STALL_S,
    idle_after: float = DEFAULT_IDLE_AFTER_S,
) -> Plan:
    """The copies to add and drop so every model reaches its factor (see the module docstring)."""
    views = model_views(snapshot, default_factor, now, constraints=constraints, stall_s=stall_s)
    alive = snapshot.alive
    room = _Room(alive)
    alive_ids = tuple(n.node for n in alive)
    adds: list[Action] = []
    drops: list[Action] = []
    for v in views:
        added = _adds(v, alive_ids, room, constraints)
        adds.extend(added)
        drops.extend(_drops(v, constraints, now, idle_after))
        upgraded = {a.node for a in added}
        if len(v.holders) >= v.target and v.holders:
            for node, copy in v.stale:
                if copy.origin != "user" and node not in upgraded and constraints.may_drop(v.key, node):
                    drops.append(Action("drop", copy.name, v.key, copy.digest, node, copy.size, "superseded"))
    return Plan(tuple(adds), tuple(drops), views)


def _adds(v: ModelView, alive: tuple[NodeId, ...], room: _Room, constraints: Constraints) -> list[Action]:
    need = v.factor - len(v.holders)
    if need <= 0 or not v.holders:
        return []
    out: list[Action] = []
    user_stale = {n for n, m in v.stale if m.origin == "user"}
    for node in v.in_progress:
        if len(out) == need:
            return out
        if node not in user_stale and constraints.may_add(v.key, node):
            fetch = room.take(node, v.blobs)
            if fetch is not None:
                out.append(Action("add", v.name, v.key, v.digest, node, fetch, "resume"))
    blocked = set(v.holders) | set(v.in_progress) | user_stale
    for node in rank(v.key, alive):
        if len(out) == need:
            break
        if node in blocked or not constraints.may_add(v.key, node):
            continue
        fetch = room.take(node, v.blobs)
        if fetch is not None:
            out.append(Action("add", v.name, v.key, v.digest, node, fetch, "under_replicated"))
    return out


def in_use(v: ModelView, node: NodeId, now: float, idle_after: float) -> bool:
    """Whether ``node``'s copy of ``v`` is a ``demand`` copy used within ``idle_after`` of ``now``."""
    return v.origins.get(node) == "demand" and now - v.last_used.get(node, 0.0) < idle_after


def _drops(v: ModelView, constraints: Constraints, now: float, idle_after: float) -> list[Action]:
    busy = [n for n in v.holders if in_use(v, n, now, idle_after)]
    surplus = len(v.holders) - len(busy) - v.factor
    if surplus <= 0:
        return []
    droppable = [n for n in reversed(v.holders)
                 if v.origins[n] != "user" and n not in busy and constraints.may_drop(v.key, n)]
    droppable.sort(key=lambda n: v.origins[n] != "demand")  # stable: rank order within each origin
    return [Action("drop", v.name, v.key, v.digest, n, v.size, "over_replicated") for n in droppable[:surplus]]
