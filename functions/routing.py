"""Which node serves a model-routed call (pure: no I/O, no clock of its own).

**Candidates** are the alive members holding the model complete, in its current
version (the newest copy on an alive node, as placement decides). Members that
hold it but are not alive are reported apart, so a caller can tell "held
nowhere" (Ollama's 404) from "held only by nodes that are down" (503).

**Score**: the expected wait before a node starts on the request, in seconds::

    busy / slots * request_s                  queued + in-flight, relative to num_parallel
  + load_s            where the model is not loaded there yet
  + load_s again      where it is not loaded and does not fit in free memory (an eviction first)

with ``load_s = load_base_s + size / load_bytes_per_s``. A lone request goes
where the model is warm; a burst spills onto an idle holder instead of queueing
behind a busy one. Candidates are ordered by (recently failed last, wait, local
first, more free memory, node id): the local node wins every tie of waits, free
memory decides between remote ones, and the answer never depends on input order.

**Load estimates** (:class:`LoadBook`): a peer's last report (polled or
piggybacked on a forwarded response), plus the requests this node sent it
since, minus the ones that finished since. A report counts the request that
carries it; every request sent later adds one and every request that finishes
takes one away, whether it was sent before or after the report.

**Wire**: a node's load travels as JSON (``GET /api/peer/load``) and as the
compact ``X-Omx-Load`` response header: ``mem=<free bytes>; np=<num_parallel>;
<model>=<loaded 0|1>,<in flight>,<queued>,<num_parallel>; ...``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omx.storage.holdings import HeldModel, model_key
from omx.storage.placement import ClusterSnapshot
from omx.types import NodeId

__all__ = [
    "LOAD_HEADER",
    "MAX_REPORTED_MODELS",
    "Avoidance",
    "Candidate",
    "DEFAULT_WEIGHTS",
    "Holders",
    "LoadBook",
    "ModelLoad",
    "NodeLoad",
    "RouteWeights",
    "expected_wait",
    "has_room",
    "holders_of",
    "load_from_header",
    "load_from_json",
    "load_to_header",
    "load_to_json",
    "rank",
]

LOAD_HEADER = "X-Omx-Load"
MAX_REPORTED_MODELS = 32
"""At most this many models in one load report (the busiest and loaded ones first)."""
_MAX_COUNT = 1_000_000
_MAX_HEADER = 4096


@dataclass(frozen=True)
class ModelLoad:
    """One model on one node: loaded?, requests running and waiting, slots."""

    loaded: bool = False
    in_flight: int = 0
    queued: int = 0
    num_parallel: int = 1

    @property
    def busy(self) -> int:
        return self.in_flight + self.queued


@dataclass(frozen=True)
class NodeLoad:
    """One node's load: per model (by :func:`~omx.storage.holdings.model_key`), plus free memory.

    ``names`` keeps the display name of each key for the wire; a model not in
    ``models`` is idle and not loaded, with the node's default ``num_parallel``.
    """

    models: Mapping[str, ModelLoad] = field(default_factory=dict)
    free_memory: int | None = None
    num_parallel: int = 1
    names: Mapping[str, str] = field(default_factory=dict)

    def model(self, key: str) -> ModelLoad:
        return self.models.get(key) or ModelLoad(num_parallel=self.num_parallel)

    @property
    def busy(self) -> int:
        """Requests running and waiting, all models together."""
        return sum(m.busy for m in self.models.values())

    @classmethod
    def of(cls, models: Mapping[str, ModelLoad], *, free_memory: int | None = None,
           num_parallel: int = 1) -> NodeLoad:
        """A load keyed by the model keys of the display names in ``models``."""
        return cls({model_key(n): m for n, m in models.items()}, free_memory, num_parallel,
                   {model_key(n): n for n in models})


@dataclass(frozen=True)
class RouteWeights:
    """The constants of the wait estimate (seconds, bytes per second)."""

    request_s: float = 1.0
    """Expected seconds one request holds a slot: the unit of queueing."""
    load_base_s: float = 0.5
    """Seconds to start a runner, whatever the model's size."""
    load_bytes_per_s: float = 1e9
    """Bytes of weights read per second while loading."""

    def load_s(self, size: int) -> float:
        return self.load_base_s + max(0, size) / self.load_bytes_per_s


DEFAULT_WEIGHTS = RouteWeights()


@dataclass(frozen=True)
class Candidate:
    """A holder as the router sees it: its estimated load (None: unknown) and facts."""

    node: NodeId
    load: ModelLoad | None = None
    free_memory: int | None = None
    local: bool = False
    avoided: bool = False
    """It failed a request a moment ago: tried only after every other candidate."""


def expected_wait(load: ModelLoad | None, size: int, free_memory: int | None,
                  weights: RouteWeights = DEFAULT_WEIGHTS) -> float:
    """Seconds before ``load``'s node would start a request for a model of ``size`` bytes (see the module doc).

    An unknown load counts as idle and not loaded.
    """
    load = load or ModelLoad()
    wait = load.busy / max(1, load.num_parallel) * weights.request_s
    if not load.loaded:
        wait += weights.load_s(size)
        if free_memory is not None and free_memory < size:
            wait += weights.load_s(size)
    return wait


def has_room(load: ModelLoad | None) -> bool:
    """Whether a node with ``load`` starts a request at once: fewer requests than slots (unknown: idle)."""
    return load is None or load.busy < max(1, load.num_parallel)


def rank(candidates: Iterable[Candidate], size: int, weights: RouteWeights = DEFAULT_WEIGHTS) -> tuple[NodeId, ...]:
    """``candidates`` best first: (avoided last, expected wait, local first, more free memory, node id)."""
    def key(c: Candidate) -> tuple[bool, float, bool, int, str]:
        return (c.avoided, expected_wait(c.load, size, c.free_memory, weights), not c.local,
                -(c.free_memory or 0), c.node)

    return tuple(c.node for c in sorted(candidates, key=key))


# ================================================================ holders


@dataclass(frozen=True)
class Holders:
    """Where one model is held: ``alive`` members with its current version, ``down`` members with any."""

    key: str
    alive: tuple[NodeId, ...] = ()
    down: tuple[NodeId, ...] = ()
    size: int = 0
    name: str = ""
    """The current version's display name (empty when held nowhere)."""


def _newest(copies: Iterable[HeldModel]) -> HeldModel:
    return max(copies, key=lambda m: (m.created_at, m.digest, m.name))


def holders_of(snapshot: ClusterSnapshot, name: str) -> Holders:
    """Who holds model ``name`` complete (``alive``: the current version only, in node id order)."""
    key = model_key(name)
    alive: list[tuple[NodeId, HeldModel]] = []
    down: list[NodeId] = []
    for view in snapshot.nodes:
        if view.holdings is None:
            continue
        copy = next((m for m in view.holdings.models if m.key == key), None)
        if copy is None:
            continue
        if view.alive:
            alive.append((view.node, copy))
        else:
            down.append(view.node)
    if not alive:
        return Holders(key, (), tuple(down))
    current = _newest(m for _, m in alive)
    return Holders(key, tuple(n for n, m in alive if m.digest == current.digest), tuple(down), current.size,
                   current.name)


# ================================================================ estimates


@dataclass
class _Peer:
    report: NodeLoad | None = None
    reported_at: float = float("-inf")
    asked_at: float = float("-inf")
    needed_at: float = float("-inf")
    delta: dict[str, int] = field(default_factory=dict)
    """Requests sent since the report, minus those finished since, per model key."""
    outstanding: dict[str, int] = field(default_factory=dict)
    """Requests this node has running there now, per model key."""


class LoadBook:
    """Peers' loads as this node last heard them, adjusted by its own requests since (see the module doc).

    ``fresh_s``: a report older than this is refreshed when the router next needs
    it, at most once every ``min_gap_s``; ``stale_s``: a report older than this
    is ignored (only this node's own requests count then).
    """

    def __init__(self, *, fresh_s: float = 0.5, min_gap_s: float = 0.25, stale_s: float = 10.0) -> None:
        self.fresh_s = fresh_s
        self.min_gap_s = min_gap_s
        self.stale_s = stale_s
        self._peers: dict[NodeId, _Peer] = {}

    def _peer(self, node: NodeId) -> _Peer:
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer()
        return peer

    def report(self, node: NodeId, load: NodeLoad, now: float) -> None:
        """``node`` reported ``load`` (counting every request of ours it had received)."""
        peer = self._peer(node)
        peer.report, peer.reported_at = load, now
        peer.delta.clear()

    def sent(self, node: NodeId, key: str) -> None:
        peer = self._peer(node)
        peer.delta[key] = peer.delta.get(key, 0) + 1
        peer.outstanding[key] = peer.outstanding.get(key, 0) + 1

    def finished(self, node: NodeId, key: str) -> None:
        peer = self._peer(node)
        peer.delta[key] = peer.delta.get(key, 0) - 1
        peer.outstanding[key] = max(0, peer.outstanding.get(key, 0) - 1)

    def outstanding(self, node: NodeId, key: str) -> int:
        peer = self._peers.get(node)
        return peer.outstanding.get(key, 0) if peer is not None else 0

    def _current(self, peer: _Peer, now: float) -> NodeLoad | None:
        if peer.report is None or now - peer.reported_at > self.stale_s:
            return None
        return peer.report

    def estimate(self, node: NodeId, key: str, now: float) -> ModelLoad | None:
        """``node``'s load for model ``key``; None when nothing is known (no report, no request of ours)."""
        peer = self._peers.get(node)
        if peer is None:
            return None
        own = peer.outstanding.get(key, 0)
        report = self._current(peer, now)
        if report is None:
            return ModelLoad(in_flight=own) if own else None
        base = report.model(key)
        busy = max(own, base.busy + peer.delta.get(key, 0), 0)
        in_flight = min(busy, max(base.in_flight, base.num_parallel))
        return ModelLoad(base.loaded, in_flight, busy - in_flight, base.num_parallel)

    def node_load(self, node: NodeId, now: float) -> NodeLoad | None:
        """``node``'s whole load as last reported, each model adjusted by this node's requests since."""
        peer = self._peers.get(node)
        report = self._current(peer, now) if peer is not None else None
        if peer is None or report is None:
            return None
        keys = set(report.models) | {k for k, n in peer.outstanding.items() if n}
        models = {k: self.estimate(node, k, now) or ModelLoad(num_parallel=report.num_parallel) for k in keys}
        return NodeLoad(models, report.free_memory, report.num_parallel, report.names)

    def free_memory(self, node: NodeId, now: float) -> int | None:
        peer = self._peers.get(node)
        report = self._current(peer, now) if peer is not None else None
        return report.free_memory if report is not None else None

    def wants_refresh(self, node: NodeId, now: float) -> bool:
        """True when ``node``'s report is older than ``fresh_s`` and nobody asked for a new one lately."""
        peer = self._peers.get(node)
        if peer is None:
            return True
        return now - peer.reported_at > self.fresh_s and now - peer.asked_at >= self.min_gap_s

    def needed(self, node: NodeId, now: float) -> None:
        """``node``'s load was needed at ``now`` (to rank it, or to show it)."""
        self._peer(node).needed_at = now

    def needed_since(self, since: float) -> tuple[NodeId, ...]:
        """The peers whose load was needed at ``since`` or later (the ones worth polling while idle)."""
        return tuple(node for node, peer in self._peers.items() if peer.needed_at >= since)

    def asked(self, node: NodeId, now: float) -> None:
        """A refresh of ``node``'s report was started at ``now``."""
        self._peer(node).asked_at = now

    def forget(self, node: NodeId) -> None:
        self._peers.pop(node, None)

    def known(self) -> tuple[NodeId, ...]:
        return tuple(self._peers)


class Avoidance:
    """Nodes that failed a request lately, avoided until a deadline."""

    def __init__(self, for_s: float = 5.0) -> None:
        self.for_s = for_s
        self._until: dict[NodeId, float] = {}

    def failed(self, node: NodeId, now: float, for_s: float | None = None) -> None:
        self._until[node] = max(self._until.get(node, now), now + (self.for_s if for_s is None else for_s))

    def avoided(self, node: NodeId, now: float) -> bool:
        until = self._until.get(node)
        if until is None:
            return False
        if now >= until:
            del self._until[node]
            return False
        return True


# ================================================================ wire


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"not a count: {value!r}")
    return value


def _slots(value: Any) -> int:
    count = _count(value)
    if count < 1:
        raise ValueError("num_parallel must be at least 1")
    return count


def _reported(load: NodeLoad) -> list[tuple[str, ModelLoad]]:
    """The models worth reporting (loaded or busy), busiest first, at most :data:`MAX_REPORTED_MODELS`."""
    rows = [(load.names.get(k, k), m) for k, m in load.models.items() if m.loaded or m.busy]
    rows.sort(key=lambda r: (-r[1].busy, not r[1].loaded, r[0]))
    return rows[:MAX_REPORTED_MODELS]


def load_to_json(load: NodeLoad) -> dict[str, Any]:
    """The body of ``GET /api/peer/load``."""
    return {"free_memory": load.free_memory, "num_parallel": load.num_parallel,
            "models": [{"name": n, "loaded": m.loaded, "in_flight": m.in_flight, "queued": m.queued,
                        "num_parallel": m.num_parallel} for n, m in _reported(load)]}


def load_from_json(doc: Any) -> NodeLoad:
    """Parse a peer's load report strictly; raises :class:`ValueError`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError("a load report is an object with a models list")
    free = doc.get("free_memory")
    models: dict[str, ModelLoad] = {}
    for row in doc["models"][:MAX_REPORTED_MODELS]:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
            raise ValueError("a load row needs a model name")
        if not isinstance(row.get("loaded"), bool):
            raise ValueError("a load row's loaded is a boolean")
        models[row["name"]] = ModelLoad(row["loaded"], _count(row.get("in_flight")), _count(row.get("queued")),
                                        _slots(row.get("num_parallel")))
    return NodeLoad.of(models, free_memory=None if free is None else _count_bytes(free),
                       num_parallel=_slots(doc.get("num_parallel")))


def _count_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a byte count: {value!r}")
    return value


def load_to_header(load: NodeLoad) -> str:
    """The ``X-Omx-Load`` value of ``load``."""
    parts = [f"mem={load.free_memory if load.free_memory is not None else ''}", f"np={load.num_parallel}"]
    parts += [f"{n}={int(m.loaded)},{m.in_flight},{m.queued},{m.num_parallel}" for n, m in _reported(load)]
    return "; ".join(parts)


def _int(text: str) -> int:
    if not text.isdigit() or len(text) > 20:
        raise ValueError(f"not a count: {text!r}")
    return int(text)


def load_from_header(value: str) -> NodeLoad:
    """Parse an ``X-Omx-Load`` value strictly; raises :class:`ValueError`."""
    if len(value) > _MAX_HEADER:
        raise ValueError("load header too long")
    free: int | None = None
    num_parallel = 1
    models: dict[str, ModelLoad] = {}
    for part in value.split(";"):
        name, sep, rest = part.strip().partition("=")
        if not sep or not name:
            raise ValueError(f"malformed load entry {part.strip()!r}")
        if name == "mem":
            free = _int(rest) if rest else None
        elif name == "np":
            num_parallel = _slots(_int(rest))
        elif len(models) < MAX_REPORTED_MODELS:
            fields = rest.split(",")
            if len(fields) != 4 or fields[0] not in ("0", "1"):
                raise ValueError(f"malformed load of {name!r}")
            models[name] = ModelLoad(fields[0] == "1", _count(_int(fields[1])), _count(_int(fields[2])),
                                     _slots(_int(fields[3])))
    return NodeLoad.of(models, free_memory=free, num_parallel=num_parallel)
