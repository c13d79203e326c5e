"""The router's pure core: candidates, expected-wait scores, load estimates and the load wire."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omx.functions.routing import (
    MAX_REPORTED_MODELS,
    Avoidance,
    Candidate,
    LoadBook,
    ModelLoad,
    NodeLoad,
    RouteWeights,
    expected_wait,
    holders_of,
    load_from_header,
    load_from_json,
    load_to_header,
    load_to_json,
    rank,
)
from omx.types import NodeId
from tests.support.placement import GB, cluster, holdings, model

A, B, C, D = (NodeId(n) for n in ("omx-a", "omx-b", "omx-c", "omx-d"))
W = RouteWeights(request_s=1.0, load_base_s=0.5, load_bytes_per_s=1e9)
SMALL = 300 * 10**6


# ------------------------------------------------------------------ expected wait


def test_an_idle_warm_node_has_no_wait() -> None:
    assert expected_wait(ModelLoad(loaded=True, num_parallel=4), SMALL, None, W) == 0.0


def test_busy_requests_count_relative_to_slots() -> None:
    assert expected_wait(ModelLoad(True, 2, 0, 1), SMALL, None, W) == 2.0
    assert expected_wait(ModelLoad(True, 2, 2, 4), SMALL, None, W) == 1.0
    assert expected_wait(ModelLoad(True, 1, 3, 2), SMALL, None, W) == 2.0


def test_a_cold_node_pays_the_load_time() -> None:
    assert expected_wait(ModelLoad(False), SMALL, None, W) == pytest.approx(0.5 + 0.3)
    assert expected_wait(ModelLoad(False), 4 * GB, 10 * GB, W) == pytest.approx(0.5 + 4.0)


def test_a_cold_node_without_room_pays_the_load_twice() -> None:
    assert expected_wait(ModelLoad(False), 4 * GB, 3 * GB, W) == pytest.approx(2 * (0.5 + 4.0))
    # Free memory does not matter where the model is loaded already.
    assert expected_wait(ModelLoad(True), 4 * GB, 0, W) == 0.0


def test_an_unknown_load_is_idle_and_cold() -> None:
    assert expected_wait(None, SMALL, None, W) == expected_wait(ModelLoad(False), SMALL, None, W)


def test_zero_slots_never_divide_by_zero() -> None:
    assert expected_wait(ModelLoad(True, 3, 0, 0), SMALL, None, W) == 3.0


# ------------------------------------------------------------------ rank


def test_a_lone_request_goes_where_the_model_is_warm() -> None:
    cands = [Candidate(B, ModelLoad(False), 100 * GB), Candidate(C, ModelLoad(True), GB)]
    assert rank(cands, SMALL, W) == (C, B)


def test_a_burst_spills_onto_an_idle_holder_instead_of_queueing() -> None:
    warm_busy = Candidate(B, ModelLoad(True, 1, 0, 1))
    cold_idle = Candidate(C, ModelLoad(False, 0, 0, 1))
    assert rank([warm_busy, cold_idle], SMALL, W) == (C, B)
    # ...but a big model is worth a short wait rather than a long load.
    assert rank([warm_busy, cold_idle], 8 * GB, W) == (B, C)


def test_the_local_node_wins_ties() -> None:
    idle = ModelLoad(True, 0, 0, 1)
    cands = [Candidate(A, idle, 0, local=True), Candidate(B, idle, 100 * GB), Candidate(C, idle, 50 * GB)]
    assert rank(cands, SMALL, W) == (A, B, C)


def test_free_memory_breaks_ties_between_remote_nodes_then_the_id() -> None:
    idle = ModelLoad(True)
    assert rank([Candidate(B, idle, GB), Candidate(C, idle, 2 * GB)], SMALL, W) == (C, B)
    assert rank([Candidate(C, idle, GB), Candidate(B, idle, GB)], SMALL, W) == (B, C)
    assert rank([Candidate(C, idle, None), Candidate(B, idle, None)], SMALL, W) == (B, C)


def test_a_recently_failed_node_comes_last_even_when_best() -> None:
    cands = [Candidate(B, ModelLoad(True), avoided=True, local=True), Candidate(C, ModelLoad(True, 5, 5, 1))]
    assert rank(cands, SMALL, W) == (C, B)


def test_a_lower_wait_beats_the_local_node() -> None:
    cands = [Candidate(A, ModelLoad(True, 1, 0, 1), local=True), Candidate(B, ModelLoad(True, 0, 0, 1))]
    assert rank(cands, SMALL, W) == (B, A)


loads = st.builds(ModelLoad, st.booleans(), st.integers(0, 6), st.integers(0, 6), st.integers(1, 4))
candidate_lists = st.lists(
    st.builds(Candidate, st.sampled_from((A, B, C, D)), st.one_of(st.none(), loads),
              st.one_of(st.none(), st.integers(0, 8).map(lambda g: g * GB)), st.booleans(), st.booleans()),
    max_size=4, unique_by=lambda c: c.node,
).map(lambda cs: [Candidate(c.node, c.load, c.free_memory, c.node == A, c.avoided) for c in cs])


@settings(max_examples=300, deadline=None)
@given(candidate_lists, st.sampled_from((SMALL, 2 * GB, 6 * GB)))
def test_rank_is_a_deterministic_ordering_of_the_candidates(cands: list[Candidate], size: int) -> None:
    ranked = rank(cands, size, W)
    assert sorted(ranked) == sorted(c.node for c in cands)
    for perm in itertools.islice(itertools.permutations(cands), 6):
        assert rank(perm, size, W) == ranked
    if not cands:
        return
    by_node = {c.node: c for c in cands}
    first = by_node[ranked[0]]
    fresh = [c for c in cands if not c.avoided]
    if fresh:
        assert not first.avoided
        best = min(expected_wait(c.load, size, c.free_memory, W) for c in fresh)
        assert expected_wait(first.load, size, first.free_memory, W) == best
        local = by_node.get(A)
        if local is not None and not local.avoided and expected_wait(local.load, size, local.free_memory, W) == best:
            assert first.node == A
    waits = [(by_node[n].avoided, expected_wait(by_node[n].load, size, by_node[n].free_memory, W)) for n in ranked]
    assert waits == sorted(waits)


# ------------------------------------------------------------------ holders


def test_holders_are_alive_nodes_with_the_current_version() -> None:
    snap = cluster({A: holdings(), B: holdings(model("tiny", 1)), C: holdings(model("tiny", 2)),
                    D: holdings(model("tiny", 2))}, dead=[D])
    found = holders_of(snap, "tiny")
    assert found.alive == (C,) and found.down == (D,)
    assert found.key == "tiny:latest" and found.name == "tiny:latest" and found.size == model("tiny", 2).size


def test_names_match_as_ollama_compares_them() -> None:
    copy = model("tiny")
    snap = cluster({B: holdings(replace(copy, name="Tiny:latest")), C: holdings(copy)})
    assert holders_of(snap, "library/tiny").alive == (B, C)


def test_held_nowhere_and_held_only_by_dead_nodes() -> None:
    snap = cluster({A: holdings(), B: holdings(model("tiny")), C: None}, dead=[B])
    assert holders_of(snap, "other") == holders_of(snap, "other")
    nowhere = holders_of(snap, "other")
    assert nowhere.alive == () and nowhere.down == () and nowhere.name == ""
    down = holders_of(snap, "tiny")
    assert down.alive == () and down.down == (B,)


# ------------------------------------------------------------------ load book


def test_no_report_and_no_request_means_unknown() -> None:
    book = LoadBook()
    assert book.estimate(B, "tiny:latest", 0.0) is None
    assert book.free_memory(B, 0.0) is None


def test_own_requests_count_before_any_report() -> None:
    book = LoadBook()
    book.sent(B, "tiny:latest")
    book.sent(B, "tiny:latest")
    assert book.estimate(B, "tiny:latest", 0.0) == ModelLoad(False, 2, 0, 1)
    book.finished(B, "tiny:latest")
    assert book.estimate(B, "tiny:latest", 0.0) == ModelLoad(False, 1, 0, 1)
    assert book.outstanding(B, "tiny:latest") == 1


def test_a_report_is_adjusted_by_requests_sent_and_finished_since() -> None:
    book = LoadBook()
    key = "tiny:latest"
    book.sent(B, key)  # r1, counted by the report below
    book.report(B, NodeLoad.of({"tiny:latest": ModelLoad(True, 1, 0, 1)}, free_memory=5 * GB), 10.0)
    assert book.estimate(B, key, 10.0) == ModelLoad(True, 1, 0, 1)
    book.sent(B, key)  # r2, after the report
    book.sent(B, key)  # r3
    assert book.estimate(B, key, 10.1) == ModelLoad(True, 1, 2, 1)
    book.finished(B, key)  # r1 (before the report) ends
    assert book.estimate(B, key, 10.1) == ModelLoad(True, 1, 1, 1)
    book.finished(B, key)
    book.finished(B, key)
    assert book.estimate(B, key, 10.2) == ModelLoad(True, 0, 0, 1)
    assert book.free_memory(B, 10.2) == 5 * GB


def test_the_estimate_never_drops_below_own_outstanding_requests() -> None:
    book = LoadBook()
    book.report(B, NodeLoad(), 0.0)  # reported idle, but a request of ours was in transit
    book.sent(B, "m:latest")
    book.finished(B, "m:latest")  # a request sent before the report and not counted by it
    book.sent(B, "m:latest")
    assert book.estimate(B, "m:latest", 0.0) == ModelLoad(False, 1, 0, 1)


def test_other_nodes_requests_in_a_report_count() -> None:
    book = LoadBook()
    book.report(B, load_from_header("mem=7; np=2; tiny:latest=1,2,3,2"), 0.0)
    assert book.estimate(B, "tiny:latest", 0.0) == ModelLoad(True, 2, 3, 2)
    assert book.estimate(B, "other:latest", 0.0) == ModelLoad(False, 0, 0, 2)


def test_a_stale_report_is_ignored() -> None:
    book = LoadBook(stale_s=10.0)
    book.report(B, NodeLoad.of({"tiny:latest": ModelLoad(True, 4, 0, 1)}, free_memory=1), 0.0)
    assert book.estimate(B, "tiny:latest", 10.0) is not None
    assert book.estimate(B, "tiny:latest", 10.5) is None
    assert book.free_memory(B, 10.5) is None


def test_refreshes_are_asked_for_old_reports_at_most_every_gap() -> None:
    book = LoadBook(fresh_s=0.5, min_gap_s=0.25)
    assert book.wants_refresh(B, 0.0)
    book.asked(B, 0.0)
    assert not book.wants_refresh(B, 0.1)
    assert book.wants_refresh(B, 0.3)  # no answer came: ask again after the gap
    book.report(B, NodeLoad(), 0.3)
    assert not book.wants_refresh(B, 0.7)
    assert book.wants_refresh(B, 0.81)
    book.forget(B)
    assert book.known() == () and book.wants_refresh(B, 0.81)


def test_a_simulated_burst_spreads_over_idle_holders_with_one_slot() -> None:
    """Ten requests arriving at once at A for a model on B and C (num_parallel 1): half each."""
    book = LoadBook()
    key = "tiny:latest"
    for node in (B, C):
        book.report(node, NodeLoad.of({"tiny:latest": ModelLoad(True, 0, 0, 1)}), 0.0)
    chosen = []
    for _ in range(10):
        cands = [Candidate(n, book.estimate(n, key, 0.0), book.free_memory(n, 0.0)) for n in (B, C)]
        node = rank(cands, SMALL, W)[0]
        book.sent(node, key)
        chosen.append(node)
    assert chosen.count(B) == 5 and chosen.count(C) == 5
    assert chosen[:2] in ([B, C], [C, B])


# ------------------------------------------------------------------ avoidance


def test_a_failed_node_is_avoided_until_its_deadline() -> None:
    avoid = Avoidance(for_s=5.0)
    avoid.failed(B, 10.0)
    assert avoid.avoided(B, 14.9) and not avoid.avoided(C, 14.9)
    assert not avoid.avoided(B, 15.0)
    avoid.failed(B, 20.0, for_s=1.0)
    avoid.failed(B, 20.5, for_s=0.1)  # a shorter penalty never cuts a longer one
    assert avoid.avoided(B, 20.9) and not avoid.avoided(B, 21.0)


# ------------------------------------------------------------------ wire


names = st.from_regex(r"[a-z][a-z0-9_.-]{0,12}(/[a-z][a-z0-9_-]{0,8})?:[a-z0-9][a-z0-9_.-]{0,8}", fullmatch=True)
node_loads = st.builds(
    lambda models, free, np: NodeLoad.of(models, free_memory=free, num_parallel=np),
    st.dictionaries(names, loads.filter(lambda m: m.loaded or m.busy > 0), max_size=5),
    st.one_of(st.none(), st.integers(0, 2**50)), st.integers(1, 8))


@settings(max_examples=200, deadline=None)
@given(node_loads)
def test_loads_round_trip_through_json_and_the_header(load: NodeLoad) -> None:
    assert load_from_json(load_to_json(load)) == load
    assert load_from_header(load_to_header(load)) == load


def test_only_loaded_or_busy_models_are_reported_busiest_first_and_capped() -> None:
    models = {f"m{i}:latest": ModelLoad(True, i % 3, 0, 1) for i in range(MAX_REPORTED_MODELS + 5)}
    models["idle:latest"] = ModelLoad(False, 0, 0, 1)
    doc = load_to_json(NodeLoad.of(models, free_memory=1, num_parallel=1))
    rows = doc["models"]
    assert len(rows) == MAX_REPORTED_MODELS and "idle:latest" not in {r["name"] for r in rows}
    assert [r["in_flight"] for r in rows] == sorted((r["in_flight"] for r in rows), reverse=True)
    header = load_to_header(NodeLoad.of({"a:latest": ModelLoad(True, 1, 2, 3)}, free_memory=None))
    assert header == "mem=; np=1; a:latest=1,1,2,3"


@pytest.mark.parametrize("value", [
    "mem=x", "np=0", "np=", "tiny=1,2,3", "tiny=2,0,0,1", "tiny=1,-1,0,1", "tiny=1,0,0,0", "=1,0,0,1",
    "garbage", "tiny=1,0,0,1;;", "mem=" + "9" * 30, "x" * 5000,
])
def test_malformed_load_headers_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        load_from_header(value)


@pytest.mark.parametrize("doc", [
    None, [], {}, {"models": {}}, {"models": [], "num_parallel": 0},
    {"models": [{"name": "", "loaded": True, "in_flight": 0, "queued": 0, "num_parallel": 1}], "num_parallel": 1},
    {"models": [{"name": "a", "loaded": 1, "in_flight": 0, "queued": 0, "num_parallel": 1}], "num_parallel": 1},
    {"models": [{"name": "a", "loaded": True, "in_flight": -1, "queued": 0, "num_parallel": 1}],
     "num_parallel": 1},
    {"models": [{"name": "a", "loaded": True, "in_flight": True, "queued": 0, "num_parallel": 1}],
     "num_parallel": 1},
    {"models": [], "num_parallel": 1, "free_memory": -5},
    {"models": ["a"], "num_parallel": 1},
])
def test_malformed_load_reports_are_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        load_from_json(doc)
