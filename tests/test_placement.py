"""Placement: the pure plan of copies to add and drop, on small in-memory clusters."""

from __future__ import annotations

from dataclasses import replace

import pytest

from omx.storage.eviction import evictions, keeper
from omx.storage.holdings import FactorOverride, Incoming
from omx.storage.placement import (
    ClusterSnapshot,
    Constraints,
    NodeView,
    Plan,
    factor_for,
    model_views,
    plan,
    rank,
    rendezvous_score,
)
from omx.storage.replication_status import model_statuses, replication_health
from omx.types import NodeId
from tests.support.placement import GB, cluster, holdings, model, partial_of

N = NodeId
PINNED = 15237303418491869715
ABC = ("a", "b", "c")


def adds(p: Plan) -> set[tuple[str, str]]:
    return {(a.key, a.node) for a in p.adds}


def drops(p: Plan) -> set[tuple[str, str]]:
    return {(a.key, a.node) for a in p.drops}


def others(key: str, holder: str, nodes: tuple[str, ...] = ABC) -> tuple[NodeId, ...]:
    return rank(key, [N(n) for n in nodes if n != holder])


# ---------------------------------------------------------------- rendezvous


def test_rendezvous_score_is_pinned() -> None:
    # Every node must compute the same ranks, across releases too: the hash is part of the protocol.
    assert rendezvous_score("tiny:latest", N("omx-00000001")) == PINNED
    assert rendezvous_score("tiny:latest", N("a")) != rendezvous_score("tiny:latest", N("b"))


def test_rank_orders_by_score_and_ignores_input_order() -> None:
    nodes = [N(f"omx-{i:08x}") for i in range(20)]
    ranked = rank("m:latest", nodes)
    assert ranked == rank("m:latest", list(reversed(nodes))) == rank("m:latest", set(nodes))
    scores = [rendezvous_score("m:latest", n) for n in ranked]
    assert scores == sorted(scores, reverse=True)
    # Different models spread over different nodes.
    firsts = {rank(f"model{i}:latest", nodes)[0] for i in range(40)}
    assert len(firsts) > 5


# ---------------------------------------------------------------- under-replication


def test_one_holder_factor_two_adds_the_best_ranked_other_node() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(), "c": holdings()})
    p = plan(snap, 2, now=0.0)
    assert adds(p) == {("m:latest", others("m:latest", "a")[0])}
    assert not p.drops
    (add,) = p.adds
    assert add.reason == "under_replicated" and add.bytes == GB + 100 and add.model == "m:latest"


def test_factor_three_fills_every_node_and_factor_above_nodes_is_every_alive_node() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(), "c": holdings()})
    assert adds(plan(snap, 3, now=0.0)) == {("m:latest", "b"), ("m:latest", "c")}
    assert adds(plan(snap, 9, now=0.0)) == {("m:latest", "b"), ("m:latest", "c")}
    full = cluster({n: holdings(model("m")) for n in ABC})
    assert plan(full, 9, now=0.0).empty


def test_ready_model_needs_nothing() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="replica")), "c": holdings()})
    assert plan(snap, 2, now=0.0).empty


def test_no_alive_holder_means_no_adds() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(), "c": holdings()}, dead={"a"})
    p = plan(snap, 2, now=0.0)
    assert p.empty
    (v,) = p.views
    assert v.holders == () and v.offline_holders == ("a",)


def test_a_failed_holder_is_replaced_by_the_survivors() -> None:
    replica = others("m:latest", "a")[0]
    spare = next(n for n in ABC if n not in ("a", replica))
    snap = cluster({"a": holdings(model("m")), replica: holdings(model("m", origin="replica")),
                    spare: holdings()}, dead={"a"})
    assert adds(plan(snap, 2, now=0.0)) == {("m:latest", spare)}


def test_nodes_without_known_holdings_are_not_candidates() -> None:
    snap = cluster({"a": holdings(model("m")), "b": None, "c": holdings()})
    assert adds(plan(snap, 3, now=0.0)) == {("m:latest", "c")}
    (v,) = model_views(snap, 3, 0.0)
    assert v.alive_nodes == 3 and v.target == 3


# ---------------------------------------------------------------- room


def test_a_node_without_room_is_skipped_for_the_next_ranked() -> None:
    first, second = others("m:latest", "a")
    snap = cluster({"a": holdings(model("m")), first: holdings(free=GB // 2), second: holdings()})
    assert adds(plan(snap, 2, now=0.0)) == {("m:latest", second)}
    tight = cluster({"a": holdings(model("m")), first: holdings(free=GB // 2), second: holdings(free=10)})
    assert plan(tight, 2, now=0.0).empty


def test_room_counts_what_the_node_already_holds_of_the_model() -> None:
    base = model("base", size=GB)
    weights = base.blobs[1]
    derived = model("derived", size=10, shared=[weights])
    first, _ = others("derived:latest", "a")
    # `first` has the shared weights already: it only lacks the small blobs.
    snap = cluster({"a": holdings(base, derived), first: holdings(base, free=1000), "c" if first != "c" else "b":
                    holdings(free=0)})
    p = plan(snap, 2, now=0.0)
    (add,) = [x for x in p.adds if x.key == "derived:latest"]
    assert add.node == first and add.bytes == 110


def test_the_cache_limit_bounds_room() -> None:
    first, second = others("m:latest", "a")
    snap = cluster({"a": holdings(model("m")), first: holdings(model("x", size=GB), cache_limit=GB + 500_000_000),
                    second: holdings()})
    assert {(a.key, a.node) for a in plan(snap, 2, now=0.0).adds if a.key == "m:latest"} == {("m:latest", second)}


def test_room_is_shared_by_every_model_of_one_plan() -> None:
    ms = [model(f"m{i}", size=GB) for i in range(4)]
    snap = cluster({"a": holdings(*ms), "b": holdings(free=int(2.5 * GB))})
    p = plan(snap, 2, now=0.0)
    assert len(p.adds) == 2 and sum(a.bytes for a in p.adds) <= 2.5 * GB
    assert [a.key for a in p.adds] == sorted(a.key for a in p.adds)


def test_blobs_shared_by_two_models_are_counted_once_per_node() -> None:
    weights = model("base").blobs[1]
    one, two = model("one", size=5, shared=[weights]), model("two", size=5, shared=[weights])
    snap = cluster({"a": holdings(one, two), "b": holdings(free=GB + 10_000)})
    p = plan(snap, 2, now=0.0)
    assert adds(p) == {("one:latest", "b"), ("two:latest", "b")}
    assert sorted(a.bytes for a in p.adds) == [105, GB + 105]


# ---------------------------------------------------------------- in progress


def test_a_partial_holder_is_resumed_instead_of_adding_another() -> None:
    m = model("m")
    last = others("m:latest", "a")[-1]
    snap = cluster({"a": holdings(m), "b" if last != "b" else "c": holdings(),
                    last: holdings(partials=[partial_of(m.blobs[1], held=range(10))])})
    p = plan(snap, 2, now=0.0)
    (add,) = p.adds
    assert (add.node, add.reason) == (last, "resume")
    assert add.bytes == GB + 100 - 10 * (1 << 20)


def test_a_fresh_incoming_entry_counts_as_in_progress_and_a_stalled_one_does_not() -> None:
    m = model("m")
    best, last = others("m:latest", "a")
    inc = Incoming("m", m.digest, "replica", started_at=0.0, updated_at=100.0)
    snap = cluster({"a": holdings(m), best: holdings(), last: holdings(incoming=[inc])})
    fresh = plan(snap, 2, now=200.0, stall_s=600.0)
    assert [(a.node, a.reason) for a in fresh.adds] == [(last, "resume")]
    stalled = plan(snap, 2, now=1000.0, stall_s=600.0)
    assert [(a.node, a.reason) for a in stalled.adds] == [(best, "under_replicated")]


def test_an_incoming_entry_for_an_older_version_is_not_progress() -> None:
    old, new = model("m", 1), model("m", 2)
    inc = Incoming("m", old.digest, "replica", 0.0, 0.0)
    snap = cluster({"a": holdings(new), "b": holdings(incoming=[inc])})
    (v,) = model_views(snap, 2, 0.0)
    assert v.in_progress == ()


def test_only_as_many_transfers_are_resumed_as_needed() -> None:
    m = model("m")
    part = partial_of(m.blobs[1], held=[0])
    snap = cluster({"a": holdings(m), "b": holdings(partials=[part]), "c": holdings(partials=[part])})
    p = plan(snap, 2, now=0.0)
    assert [a.node for a in p.adds] == [rank("m:latest", ["b", "c"])[0]]


# ---------------------------------------------------------------- over-replication


def test_lowering_the_factor_drops_replicas_never_user_copies() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="replica")),
                    "c": holdings(model("m", origin="replica"))})
    p = plan(snap, 2, now=0.0)
    lowest = rank("m:latest", ["b", "c"])[-1]
    assert drops(p) == {("m:latest", lowest)} and not p.adds
    assert p.drops[0].reason == "over_replicated"
    assert drops(plan(snap, 1, now=0.0)) == {("m:latest", "b"), ("m:latest", "c")}


def test_user_copies_are_never_dropped_even_far_over_the_factor() -> None:
    snap = cluster({n: holdings(model("m")) for n in ABC})
    assert plan(snap, 1, now=0.0).empty


def test_the_last_copy_is_never_dropped() -> None:
    snap = cluster({"a": holdings(model("m", origin="replica")), "b": holdings(), "c": holdings()})
    p = plan(snap, 1, now=0.0)
    assert p.empty
    all_replicas = cluster({n: holdings(model("m", origin="replica")) for n in ABC})
    kept = {n for n in ABC} - {node for _, node in drops(plan(all_replicas, 1, now=0.0))}
    assert kept == {rank("m:latest", ABC)[0]}


def test_a_demand_copy_stays_while_used_and_goes_idle_after_its_last_request() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="demand", last_used=1000.0))})
    assert plan(snap, 1, now=1000.0 + 599, idle_after=600).empty
    assert drops(plan(snap, 1, now=1000.0 + 600, idle_after=600)) == {("m:latest", "b")}
    assert drops(plan(snap, 1, now=1000.0 + 30, idle_after=30)) == {("m:latest", "b")}


def test_a_demand_copy_in_use_is_not_surplus_and_idle_ones_go_first() -> None:
    copies = {"a": model("m"), "b": model("m", origin="replica"), "c": model("m", origin="demand", last_used=50.0)}
    snap = cluster({n: holdings(m) for n, m in copies.items()})
    assert plan(snap, 2, now=100.0, idle_after=600).empty  # c is in use: b (a replica of the factor) stays
    assert drops(plan(snap, 2, now=700.0, idle_after=600)) == {("m:latest", "c")}  # idle: c goes, never b
    idle_demand = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="demand")),
                           "c": holdings(model("m", origin="replica"))})
    assert drops(plan(idle_demand, 2, now=700.0, idle_after=600)) == {("m:latest", "b")}


def test_idle_demand_copies_never_go_below_the_factor() -> None:
    snap = cluster({n: holdings(model("m", origin="demand")) for n in ABC})
    p = plan(snap, 2, now=10_000.0, idle_after=600)
    assert len(drops(p)) == 1
    assert apply_drops_left(snap, p) == 2


def apply_drops_left(snap: ClusterSnapshot, p: Plan) -> int:
    gone = {node for _, node in drops(p)}
    return sum(1 for n in snap.nodes if n.node not in gone)


def test_dead_holders_do_not_count_toward_the_factor() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="replica")),
                    "c": holdings(model("m", origin="replica"))}, dead={"a"})
    assert plan(snap, 2, now=0.0).empty


# ---------------------------------------------------------------- constraints


def test_keep_protects_a_copy_from_being_dropped() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="replica")),
                    "c": holdings(model("m", origin="replica"))})
    lowest, other = rank("m:latest", ["b", "c"])[-1], rank("m:latest", ["b", "c"])[0]
    p = plan(snap, 2, now=0.0, constraints=Constraints(keep=frozenset({("m:latest", lowest)})))
    assert drops(p) == {("m:latest", other)}


def test_avoid_keeps_a_migrated_model_away_from_its_source() -> None:
    best = others("m:latest", "b")[0]
    snap = cluster({"a": holdings(), "b": holdings(model("m")), "c": holdings()})
    p = plan(snap, 2, now=0.0, constraints=Constraints(avoid=frozenset({("m:latest", best)})))
    assert adds(p) == {("m:latest", next(n for n in ("a", "c") if n != best))}
    blocked = plan(snap, 2, now=0.0, constraints=Constraints(avoid_nodes=frozenset({N("a"), N("c")})))
    assert blocked.empty


def test_a_leaving_copy_is_not_a_holder_and_is_neither_dropped_nor_re_added() -> None:
    # Migration a -> b under way: b is fetching, a's copy will go; c holds a replica.
    m = model("m")
    inc = Incoming("m", m.digest, "user", 0.0, 0.0)
    snap = cluster({"a": holdings(m), "b": holdings(incoming=[inc]), "c": holdings(model("m", origin="replica"))})
    leaving = Constraints(leaving=frozenset({("m:latest", N("a"))}), keep=frozenset({("m:latest", N("b"))}))
    p = plan(snap, 2, now=0.0, constraints=leaving)
    assert drops(p) == set()
    assert adds(p) == {("m:latest", "b")}
    (v,) = p.views
    assert v.holders == ("c",)


# ---------------------------------------------------------------- versions


def test_the_newest_version_wins_and_stale_replicas_are_upgraded_or_dropped() -> None:
    best = others("m:latest", "a")[0]
    rest = next(n for n in ("b", "c") if n != best)
    snap = cluster({"a": holdings(model("m", 2)), best: holdings(model("m", 1, origin="replica")),
                    rest: holdings(model("m", 1, origin="replica"))})
    p = plan(snap, 2, now=0.0)
    assert adds(p) == {("m:latest", best)}
    assert p.adds[0].digest == model("m", 2).digest
    assert drops(p) == set()  # not until the new version is ready
    ready = cluster({"a": holdings(model("m", 2)), best: holdings(model("m", 2, origin="replica")),
                     rest: holdings(model("m", 1, origin="replica"))})
    p2 = plan(ready, 2, now=0.0)
    assert not p2.adds and [(d.node, d.reason, d.digest) for d in p2.drops] == [
        (rest, "superseded", model("m", 1).digest)]


def test_a_stale_user_copy_is_never_overwritten_nor_dropped() -> None:
    snap = cluster({"a": holdings(model("m", 2)), "b": holdings(model("m", 1)), "c": holdings(free=0)})
    p = plan(snap, 2, now=0.0)
    assert p.empty
    (v,) = p.views
    assert v.digest == model("m", 2).digest and [n for n, _ in v.stale] == ["b"]


def test_names_are_compared_case_insensitively() -> None:
    upper = model("Tiny")
    snap = cluster({"a": holdings(upper), "b": holdings(replace(upper, name="tiny:latest", origin="replica"))})
    (v,) = model_views(snap, 2, 0.0)
    assert v.key == "tiny:latest"
    assert set(v.holders) == {"a", "b"}


# ---------------------------------------------------------------- factors


def test_factor_overrides_are_last_writer_wins_across_nodes_including_dead_ones() -> None:
    f_old = FactorOverride("m", 3, set_at=10.0)
    f_new = FactorOverride("M", 1, set_at=20.0)
    snap = cluster({"a": holdings(model("m"), factors=[f_old]), "b": holdings(factors=[f_new]), "c": holdings()},
                   dead={"b"})
    assert factor_for("m", snap.factors(), 2) == 1
    (v,) = model_views(snap, 2, 0.0)
    assert v.factor == 1
    reset = cluster({"a": holdings(model("m"), factors=[f_new, ]), "b": holdings(
        factors=[FactorOverride("m", None, 30.0)])})
    assert factor_for("m", reset.factors(), 2) == 2


def test_a_factor_override_changes_the_plan() -> None:
    snap = cluster({"a": holdings(model("m"), factors=[FactorOverride("m", 3, 1.0)]), "b": holdings(),
                    "c": holdings()})
    assert adds(plan(snap, 1, now=0.0)) == {("m:latest", "b"), ("m:latest", "c")}


# ---------------------------------------------------------------- the plan object


def test_plan_for_node_and_json() -> None:
    snap = cluster({"a": holdings(model("m"), model("n")), "b": holdings(), "c": holdings()})
    p = plan(snap, 3, now=0.0)
    mine = p.for_node(N("b"))
    assert {a.node for a in mine.adds} == {"b"} and len(mine.adds) == 2
    doc = p.to_json()
    assert doc[0] == {"action": "add", "model": "m:latest", "digest": model("m").digest, "node": p.adds[0].node,
                      "bytes": GB + 100, "reason": "under_replicated"}


def test_snapshot_rejects_duplicates_and_validates_the_factor() -> None:
    with pytest.raises(ValueError):
        ClusterSnapshot.of([NodeView(N("a"), True, None), NodeView(N("a"), False, None)])
    with pytest.raises(ValueError):
        plan(cluster({"a": holdings()}), 0, now=0.0)


# ---------------------------------------------------------------- status and health


def test_model_status_and_replication_health() -> None:
    m_ready, m_partial, m_alone, m_lost = model("ready"), model("moving"), model("alone"), model("lost")
    part = partial_of(m_partial.blobs[1], held=[0])
    snap = cluster({
        "a": holdings(m_ready, m_partial, m_alone),
        "b": holdings(replace(m_ready, origin="replica"), partials=[part]),
        "c": holdings(m_lost),
    }, dead={"c"})
    rows = {s.key: s for s in model_statuses(snap, 2, 0.0)}
    assert {k: s.status for k, s in rows.items()} == {
        "alone:latest": "under_replicated", "lost:latest": "unavailable", "moving:latest": "replicating",
        "ready:latest": "ready"}
    ready = rows["ready:latest"]
    assert ready.replicas == 2 and set(ready.nodes) == {"a", "b"} and ready.total_size == m_ready.size
    assert ready.to_json()["status"] == "ready" and ready.to_json()["factor"] == 2
    assert rows["lost:latest"].offline_holders == ("c",) and rows["moving:latest"].in_progress == ("b",)
    assert replication_health(rows.values()) == "critical"
    assert replication_health(s for k, s in rows.items() if k != "lost:latest") == "degraded"
    assert replication_health([rows["ready:latest"]]) == "healthy"
    assert replication_health([]) == "healthy"


def test_a_model_on_every_alive_node_is_ready_even_below_its_factor() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="replica")), "c": holdings()},
                   dead={"c"})
    (row,) = model_statuses(snap, 5, 0.0)
    assert row.status == "ready"


# ---------------------------------------------------------------- evictions


def _evict(snap: ClusterSnapshot, node: str, limit: int, keep: tuple[str, ...] = ()) -> list[str]:
    return [m.key for m in evictions(snap, N(node), limit, keep=keep)]


def test_evictions_take_least_recently_used_replicas_held_elsewhere_until_under_the_limit() -> None:
    old, mid, new = (model(n, origin="replica", last_used=t) for n, t in (("old", 1.0), ("mid", 2.0), ("new", 3.0)))
    mine = holdings(old, mid, new, model("own", last_used=0.0))
    snap = cluster({"a": mine, "b": holdings(model("old"), model("mid"), model("new"))})
    total = mine.used_bytes
    assert _evict(snap, "a", total) == []
    assert _evict(snap, "a", total - 1) == ["old:latest"]
    assert _evict(snap, "a", total - GB - 101) == ["old:latest", "mid:latest"]
    assert _evict(snap, "a", 0) == ["old:latest", "mid:latest", "new:latest"]  # never "own": a user copy
    assert _evict(snap, "a", 0, keep=("MID",)) == ["old:latest", "new:latest"]


def test_evictions_need_another_alive_holder_of_the_same_version() -> None:
    r = model("m", origin="replica")
    assert _evict(cluster({"a": holdings(r), "b": holdings()}), "a", 0) == []
    assert _evict(cluster({"a": holdings(r), "b": holdings(model("m"))}, dead={"b"}), "a", 0) == []
    assert _evict(cluster({"a": holdings(r), "b": holdings(model("m", 2))}), "a", 0) == []
    assert _evict(cluster({"a": holdings(r), "b": holdings(model("m"))}), "a", 0) == ["m:latest"]


def test_two_pressed_nodes_never_both_evict_the_last_two_copies() -> None:
    r = model("m", origin="replica")
    snap = cluster({"a": holdings(r, cache_limit=0), "b": holdings(r, cache_limit=0)})
    evicted = {n for n in ("a", "b") if _evict(snap, n, 0)}
    assert len(evicted) == 1
    # The keeper is the best ranked holder within its limit when there is one.
    relaxed = cluster({"a": holdings(r, cache_limit=0), "b": holdings(r)})
    assert keeper(relaxed, r) == "b" and _evict(relaxed, "a", 0) == ["m:latest"]


def test_evicting_a_model_whose_blobs_stay_in_use_is_skipped() -> None:
    weights = model("base").blobs[1]
    derived = model("derived", size=10, origin="replica", shared=[weights])
    snap = cluster({"a": holdings(model("base"), derived), "b": holdings(replace(derived, origin="user"))})
    # Removing `derived` frees only its 110 bytes of small blobs.
    assert _evict(snap, "a", 0) == ["derived:latest"]
    only_shared = replace(derived, blobs=(weights,))
    snap2 = cluster({"a": holdings(model("base"), only_shared), "b": holdings(replace(only_shared, origin="user"))})
    assert _evict(snap2, "a", 0) == []


def test_read_only_copies_are_never_evicted() -> None:
    r = model("m", origin="replica", read_only=True)
    assert _evict(cluster({"a": holdings(r), "b": holdings(model("m"))}), "a", 0) == []
