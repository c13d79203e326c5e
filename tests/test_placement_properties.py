"""Placement invariants over many random clusters (hypothesis)."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from omx.storage.eviction import evictions
from omx.storage.holdings import FactorOverride, HeldModel, Holdings, Incoming
from omx.storage.placement import ClusterSnapshot, NodeView, Plan, model_views, plan
from omx.types import NodeId
from tests.support.placement import GB, apply, holdings, model, partial_of

NAMES = ("alpha", "beta", "gamma", "delta")
FREE = (0, GB // 2, 2 * GB, 3 * GB, 100 * GB)


@st.composite
def node_holdings(draw: st.DrawFn, ample: bool) -> Holdings:
    models: list[HeldModel] = []
    partials = []
    incoming = []
    for name in NAMES:
        kind = draw(st.sampled_from(("none", "none", "v1", "v2", "partial", "incoming")))
        origin = draw(st.sampled_from(("user", "replica", "replica", "demand")))
        version = draw(st.sampled_from((1, 2)))
        size = GB * draw(st.integers(1, 2))
        m = model(name, version, size=size, origin=origin)
        if kind in ("v1", "v2"):
            models.append(model(name, 1 if kind == "v1" else 2, size=size, origin=origin))
        elif kind == "partial" and not ample:
            partials.append(partial_of(m.blobs[1], held=draw(st.sets(st.integers(0, 20), max_size=5))))
        elif kind == "incoming" and not ample:
            incoming.append(Incoming(m.name, m.digest, origin, 0.0, draw(st.sampled_from((0.0, 900.0)))))
    factors = []
    if draw(st.booleans()):
        factors.append(FactorOverride(draw(st.sampled_from(NAMES)), draw(st.one_of(st.none(), st.integers(1, 4))),
                                      float(draw(st.integers(0, 5)))))
    free = 1000 * GB if ample else draw(st.sampled_from(FREE))
    return holdings(*models, free=free, partials=partials, incoming=incoming, factors=factors)


@st.composite
def clusters(draw: st.DrawFn, ample: bool = False) -> ClusterSnapshot:
    count = draw(st.integers(1, 6))
    nodes = []
    for i in range(count):
        alive = True if ample else draw(st.sampled_from((True, True, True, False)))
        known = True if ample else draw(st.sampled_from((True, True, True, True, False)))
        nodes.append(NodeView(NodeId(f"omx-{i:08x}"), alive, draw(node_holdings(ample)) if known else None))
    return ClusterSnapshot.of(nodes)


factors = st.integers(1, 5)
NOW = 1000.0


def copy_at(snap: ClusterSnapshot, node: str, key: str) -> HeldModel | None:
    view = snap.get(NodeId(node))
    assert view is not None and view.holdings is not None
    return view.holdings.model(key)


@settings(max_examples=150, deadline=None)
@given(clusters(), factors, st.randoms(use_true_random=False))
def test_deterministic_and_independent_of_node_order(snap: ClusterSnapshot, factor: int, rnd: object) -> None:
    shuffled = list(snap.nodes)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert plan(ClusterSnapshot.of(shuffled), factor, NOW) == plan(snap, factor, NOW)


@settings(max_examples=120, deadline=None)
@given(clusters(), factors)
def test_drops_never_touch_user_copies_nor_the_last_copies(snap: ClusterSnapshot, factor: int) -> None:
    p = plan(snap, factor, NOW)
    views = {v.key: v for v in p.views}
    dropped: dict[str, set[str]] = defaultdict(set)
    for d in p.drops:
        copy = copy_at(snap, d.node, d.key)
        assert copy is not None and copy.digest == d.digest
        assert copy.origin != "user"
        v = views[d.key]
        if d.reason == "over_replicated":
            assert d.node in v.holders
            dropped[d.key].add(d.node)
        else:
            assert d.reason == "superseded" and d.digest != v.digest and len(v.holders) >= v.target >= 1
    for key, gone in dropped.items():
        v = views[key]
        remaining = set(v.holders) - gone
        assert len(remaining) >= v.factor >= 1
        assert not any(a.key == key for a in p.adds)


@settings(max_examples=120, deadline=None)
@given(clusters(), factors)
def test_adds_go_to_alive_nodes_with_room_that_lack_the_model(snap: ClusterSnapshot, factor: int) -> None:
    p = plan(snap, factor, NOW)
    views = {v.key: v for v in p.views}
    spent: dict[str, int] = defaultdict(int)
    per_model: dict[str, int] = defaultdict(int)
    for a in p.adds:
        node = snap.get(NodeId(a.node))
        assert node is not None and node.alive and node.holdings is not None
        v = views[a.key]
        assert v.holders, "nothing is added without an alive source"
        assert a.node not in v.holders and a.digest == v.digest
        held = node.holdings.model(a.key)
        assert held is None or held.origin != "user", "a user's copy is never overwritten"
        spent[a.node] += a.bytes
        per_model[a.key] += 1
    for node, total in spent.items():
        h = snap.get(NodeId(node)).holdings  # type: ignore[union-attr]
        assert h is not None and total <= h.room
    for key, count in per_model.items():
        assert count <= views[key].factor - len(views[key].holders)
    assert not ({(a.key, a.node) for a in p.adds} & {(d.key, d.node) for d in p.drops})


@settings(max_examples=120, deadline=None)
@given(clusters(), factors)
def test_reconciling_converges(snap: ClusterSnapshot, factor: int) -> None:
    for _ in range(4):
        p = plan(snap, factor, NOW)
        if p.empty:
            break
        snap = apply(snap, p)
    assert plan(snap, factor, NOW).empty


@settings(max_examples=120, deadline=None)
@given(clusters(ample=True), factors)
def test_with_room_everywhere_every_model_reaches_its_target(snap: ClusterSnapshot, factor: int) -> None:
    snap = apply(snap, plan(snap, factor, NOW))
    snap = apply(snap, plan(snap, factor, NOW))
    for v in model_views(snap, factor, NOW):
        assert v.holders
        # Nodes with another version as a user's copy cannot take this one.
        blocked = sum(1 for _, m in v.stale if m.origin == "user")
        assert len(v.holders) >= min(v.factor, v.alive_nodes - blocked)


def _by_model(p: Plan, kind: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a in (p.adds if kind == "add" else p.drops):
        out[a.key].add(a.node)
    return out


@settings(max_examples=150, deadline=None)
@given(clusters(ample=True), factors)
def test_a_new_node_moves_at_most_one_assignment_per_model(snap: ClusterSnapshot, factor: int) -> None:
    newcomer = NodeView(NodeId("omx-ffffffff"), True, holdings(free=1000 * GB))
    before = _by_model(plan(snap, factor, NOW), "add")
    after = _by_model(plan(ClusterSnapshot.of((*snap.nodes, newcomer)), factor, NOW), "add")
    for key in set(before) | set(after):
        old, new = before.get(key, set()), after.get(key, set())
        moved = new - old
        assert moved <= {"omx-ffffffff"}
        assert len(old - new) <= 1 and len(old - new) == len(moved) - (len(new) - len(old))


@settings(max_examples=150, deadline=None)
@given(clusters(ample=True), st.integers(1, 4))
def test_raising_the_factor_only_adds_and_lowering_it_only_drops_more(snap: ClusterSnapshot, factor: int) -> None:
    no_overrides = ClusterSnapshot.of(
        NodeView(n.node, n.alive, Holdings.of(models=n.holdings.models, blobs=n.holdings.blobs,
                                              free_bytes=n.holdings.free_bytes) if n.holdings else None)
        for n in snap.nodes)
    low, high = plan(no_overrides, factor, NOW), plan(no_overrides, factor + 1, NOW)
    low_adds, high_adds = _by_model(low, "add"), _by_model(high, "add")
    for key, nodes in low_adds.items():
        assert nodes <= high_adds[key]
    low_drops, high_drops = _by_model(low, "drop"), _by_model(high, "drop")
    for key, nodes in high_drops.items():
        assert nodes <= low_drops[key]


@settings(max_examples=150, deadline=None)
@given(clusters(), st.sampled_from((0, GB, 3 * GB)))
def test_evictions_on_every_node_at_once_never_lose_a_model(snap: ClusterSnapshot, limit: int) -> None:
    evicted = {(m.key, n.node) for n in snap.alive for m in evictions(snap, n.node, limit)}
    for key, node in evicted:
        copy = copy_at(snap, node, key)
        assert copy is not None and copy.origin != "user" and not copy.read_only
    for v in model_views(snap, 1, NOW):
        if v.holders:
            assert set(v.holders) - {node for key, node in evicted if key == v.key}
