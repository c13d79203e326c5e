"""The chunk fetch planner: pure, so every rule is checked with explicit clocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omx.storage.fetch_plan import ALL, LOCAL, Assignment, FetchPlan


def drain(plan: FetchPlan, now: float = 0.0) -> list[tuple[int, str]]:
    """Complete assignments as they come until the plan is done; returns (chunk, source) in order."""
    got = []
    for _ in range(10_000):
        batch = plan.assign(now)
        if not batch:
            break
        for a in batch:
            plan.completed(a)
            got.append((a.chunk, a.source))
    return got


def test_hands_out_missing_chunks_up_to_concurrency() -> None:
    plan = FetchPlan(10, held={0, 1}, concurrency=3)
    plan.set_source("A", ALL)
    first = plan.assign(0.0)
    assert [a.chunk for a in first] == [2, 3, 4] and {a.source for a in first} == {"A"}
    assert plan.assign(0.0) == []
    plan.completed(first[0])
    assert [a.chunk for a in plan.assign(0.0)] == [5]
    for a in plan.running:
        plan.completed(a)
    drain(plan)
    assert plan.done and plan.missing == set()


def test_empty_blob_and_fully_held_blob_are_done() -> None:
    assert FetchPlan(0).done
    plan = FetchPlan(3, held=range(3))
    plan.set_source("A", ALL)
    assert plan.done and plan.assign(0.0) == []
    assert FetchPlan(3, held={-1, 7}).missing == {0, 1, 2}


@pytest.mark.parametrize("bad", [dict(chunk_count=-1), dict(concurrency=0), dict(stall_timeout=0),
                                 dict(max_bad=0), dict(max_failures=0)])
def test_rejects_bad_settings(bad: dict[str, int]) -> None:
    args = {"chunk_count": 4, **bad}
    count = args.pop("chunk_count")
    with pytest.raises(ValueError):
        FetchPlan(count, **args)


def test_rarest_first_and_the_least_busy_source_takes_each_slot() -> None:
    plan = FetchPlan(10, concurrency=3)
    plan.set_source("A", ALL)
    plan.set_source("B", range(5))
    got = [(a.chunk, a.source) for a in plan.assign(0.0)]
    # Chunks 5..9 only A has; B's chunks are common, so B takes the lowest of them.
    assert got == [(5, "A"), (0, "B"), (6, "A")]


def outside_order(rank: int, held: frozenset[int] = frozenset(), together: int = 3) -> list[int]:
    """The chunks a node of ``rank`` takes from one complete source after its own run (12 chunks)."""
    plan = FetchPlan(12, held=held, concurrency=4)
    plan.set_source("A", ALL)
    plan.share(rank, together)
    run = range(12 * rank // together, 12 * (rank + 1) // together)
    first = plan.assign(0.0)
    assert [a.chunk for a in first] == [c for c in run if c not in held]  # never past its run meanwhile
    for a in first:
        plan.completed(a)
    got = []
    while not plan.done:
        batch = plan.assign(0.0)
        assert len(batch) == 1, "a source holding everything gets one chunk outside the run at a time"
        plan.completed(batch[0])
        got.append(batch[0].chunk)
    assert sorted(got) == sorted(set(range(12)) - set(run) - held)
    return got


def test_a_node_takes_its_run_first_then_helps_from_the_ends_of_the_others_in_its_stripe() -> None:
    # Runs 0..3, 4..7, 8..11. Node 1 helps run 0 with the chunks 0, 2 from its end, run 2 with 1, 3.
    assert outside_order(1, held=frozenset({5})) == [3, 10, 1, 8, 11, 2, 9, 0]
    # Helpers of one run take different chunks from its end first: node 1 takes 3, 1; node 2 takes 2, 0.
    assert outside_order(2)[:4] == [7, 2, 5, 0]
    alone = FetchPlan(12, concurrency=4)
    alone.set_source("A", ALL)
    alone.share(0, 1)
    assert [c for c, _ in drain(alone)] == list(range(12))

    plan = FetchPlan(12, concurrency=2)
    plan.set_source("A", ALL)
    plan.set_source("B", {0, 1, 2, 3, 4})
    plan.share(0, 3)  # chunks 0..3, all held by B as well
    # Chunks only A holds are rarer than the run's: A helps (the end of run 2); B takes the run's first.
    assert [(a.chunk, a.source) for a in plan.assign(0.0)] == [(11, "A"), (0, "B")]

    with pytest.raises(ValueError):
        plan.share(3, 3)


def test_among_idle_sources_the_one_with_the_rarest_chunk_goes_first() -> None:
    plan = FetchPlan(10, concurrency=1)
    plan.set_source("A", ALL)
    plan.set_source("B", range(5))
    got = []
    for _ in range(6):
        [a] = plan.assign(0.0)
        plan.completed(a)
        got.append((a.chunk, a.source))
    # A was given more so far, yet it keeps the slot while it alone has chunks to give; then B's turn.
    assert got == [(5, "A"), (6, "A"), (7, "A"), (8, "A"), (9, "A"), (0, "B")]


def test_equal_sources_share_the_work() -> None:
    plan = FetchPlan(40, concurrency=4)
    for s in ("A", "B"):
        plan.set_source(s, ALL)
    batch = plan.assign(0.0)
    assert sorted(a.source for a in batch) == ["A", "A", "B", "B"]
    counts = {"A": 0, "B": 0}
    for _, source in drain(plan):
        counts[source] += 1
    assert abs(counts["A"] - counts["B"]) <= 2


def test_local_chunks_are_copied_before_peers_are_asked() -> None:
    plan = FetchPlan(6, concurrency=2)
    plan.set_source("A", ALL)
    plan.set_source(LOCAL, {1, 4})
    batch = plan.assign(0.0)
    assert [(a.chunk, a.source) for a in batch] == [(1, LOCAL), (4, LOCAL)]
    for a in batch:
        plan.completed(a)
    got = drain(plan)
    assert {c for c, s in got if s == "A"} == {0, 2, 3, 5}


def test_a_chunk_runs_once_until_it_stalls_then_once_more_elsewhere() -> None:
    plan = FetchPlan(1, concurrency=2, stall_timeout=10.0)
    plan.set_source("A", ALL)
    plan.set_source("B", ALL)
    [first] = plan.assign(0.0)
    assert plan.assign(9.9) == []
    assert plan.next_wakeup(0.0) == 10.0
    [dup] = plan.assign(10.0)
    assert dup.chunk == first.chunk and dup.source != first.source
    assert plan.assign(100.0) == []  # never a third copy
    assert plan.completed(dup) == [first]
    assert plan.done and plan.running == []


def test_a_stalled_chunk_with_one_holder_is_not_duplicated_on_it() -> None:
    plan = FetchPlan(2, concurrency=1, stall_timeout=5.0)
    plan.set_source("A", ALL)
    [first] = plan.assign(0.0)
    # The stalled run no longer counts against the limit: the next chunk starts.
    [second] = plan.assign(6.0)
    assert (first.chunk, second.chunk) == (0, 1)
    assert plan.assign(20.0) == []


def test_a_bad_chunk_is_refetched_elsewhere_and_its_source_penalised() -> None:
    plan = FetchPlan(4, concurrency=1, max_bad=2)
    plan.set_source("A", ALL)
    plan.set_source("B", ALL)
    [a] = plan.assign(0.0)
    assert a.source == "A"
    plan.failed(a, 0.0, bad=True)
    assert plan.sources["A"].bad == 1 and not plan.sources["A"].banned
    [again] = plan.assign(0.0)
    assert (again.chunk, again.source) == (a.chunk, "B")
    plan.completed(again)
    [nxt] = plan.assign(0.0)
    assert nxt.source == "A"  # still used for other chunks
    plan.failed(nxt, 0.0, bad=True)
    assert plan.sources["A"].banned
    rest = drain(plan)
    assert {s for _, s in rest} == {"B"} and plan.done


def test_a_banned_source_is_never_used_again_even_if_it_reannounces() -> None:
    plan = FetchPlan(3, concurrency=1, max_bad=1)
    plan.set_source("A", ALL)
    [a] = plan.assign(0.0)
    plan.failed(a, 0.0, bad=True)
    plan.set_source("A", ALL)
    assert plan.assign(0.0) == [] and plan.stuck()
    assert plan.unavailable() == {0, 1, 2}


def test_a_failing_source_rests_with_backoff_then_is_dropped() -> None:
    plan = FetchPlan(2, concurrency=1, max_failures=3, backoff=1.0, max_backoff=3.0)
    plan.set_source("A", ALL)
    now = 0.0
    waits = []
    for _ in range(3):
        [a] = plan.assign(now)
        plan.failed(a, now, bad=False)
        wake = plan.next_wakeup(now)
        if wake is None:
            break
        assert plan.assign(now) == []
        waits.append(wake - now)
        now = wake
    assert waits == [1.0, 2.0]
    assert plan.sources["A"].dropped and plan.stuck()
    plan.set_source("A", ALL)  # it came back (e.g. rejoined)
    assert not plan.stuck() and len(plan.assign(now)) == 1


def test_a_failed_chunk_prefers_another_source_but_retries_its_only_holder() -> None:
    plan = FetchPlan(1, concurrency=1, backoff=0.1)
    plan.set_source("A", {0})
    plan.set_source("B", ALL)
    [a] = plan.assign(0.0)
    assert (a.chunk, a.source) == (0, "A")
    plan.failed(a, 0.0, bad=False)
    [b] = plan.assign(0.0)
    assert (b.chunk, b.source) == (0, "B")
    plan.failed(b, 0.0, bad=False)
    # Both failed chunk 0 once; once rested, either may retry it.
    [c] = plan.assign(1.0)
    assert c.chunk == 0


def test_a_vanished_source_gives_its_chunks_back() -> None:
    plan = FetchPlan(4, concurrency=2)
    plan.set_source("A", ALL)
    plan.set_source("B", ALL)
    batch = plan.assign(0.0)
    lost = plan.remove_source("B")
    assert [x.source for x in lost] == ["B"]
    assert plan.remove_source("nobody") == []
    got = drain(plan)
    for a in plan.running:
        plan.completed(a)
    assert {c for c, _ in got} | {a.chunk for a in batch if a.source == "A"} == {0, 1, 2, 3}
    assert plan.done and "B" not in plan.sources


def test_a_swarm_peer_that_grows_unsticks_the_transfer() -> None:
    plan = FetchPlan(3, concurrency=3)
    plan.set_source("S", set())
    assert plan.stuck() and plan.assign(0.0) == []
    plan.add_chunks("S", {0, 1})
    assert [a.chunk for a in plan.assign(0.0)] == [0, 1]
    plan.add_chunks("S", {2})
    plan.add_chunks("T", {2})  # a new source announced by its chunks
    assert [a.chunk for a in plan.assign(0.0)] == [2]
    assert not plan.stuck()


def test_mark_held_and_completing_a_chunk_of_a_removed_source() -> None:
    plan = FetchPlan(3, concurrency=1)
    plan.set_source("A", ALL)
    [a] = plan.assign(0.0)
    plan.remove_source("A")
    assert plan.completed(a) == [] and 0 in plan.held
    plan.mark_held(1)
    plan.set_source("B", ALL)
    assert [x.chunk for x in plan.assign(0.0)] == [2]
    assert plan.summary()["B"]["in_flight"] == 1


def test_cancelled_assignment_requeues_the_chunk() -> None:
    plan = FetchPlan(1, concurrency=1)
    plan.set_source("A", ALL)
    [a] = plan.assign(0.0)
    plan.cancelled(a)
    [again] = plan.assign(0.0)
    assert again == Assignment(0, "A", 0.0)


# --------------------------------------------------------------- properties

_OPS = st.lists(st.tuples(st.sampled_from(["assign", "ok", "bad", "fail", "tick", "grow", "vanish", "appear"]),
                          st.integers(0, 1000)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 24), held=st.sets(st.integers(0, 23)), concurrency=st.integers(1, 5),
       avail=st.lists(st.one_of(st.none(), st.sets(st.integers(0, 23))), min_size=1, max_size=4), ops=_OPS)
def test_invariants_hold_under_any_sequence_of_events(count: int, held: set[int], concurrency: int,
                                                      avail: list[set[int] | None], ops: list[tuple[str, int]]) -> None:
    stall = 10.0
    plan = FetchPlan(count, held, concurrency=concurrency, stall_timeout=stall, max_bad=2, max_failures=3,
                     backoff=1.0, max_backoff=4.0)
    names = [f"P{i}" for i in range(len(avail))]
    for name, a in zip(names, avail, strict=True):
        plan.set_source(name, ALL if a is None else a)
    now = 0.0
    for op, n in ops:
        running = plan.running
        if op == "assign":
            for a in plan.assign(now):
                state = plan.sources[a.source]
                assert a.chunk not in plan.held and state.holds(a.chunk)
                assert not state.banned and not state.dropped and state.rest_until <= now
        elif op in ("ok", "bad", "fail") and running:
            a = running[n % len(running)]
            if op == "ok":
                for dup in plan.completed(a):
                    assert dup.chunk == a.chunk
            else:
                plan.failed(a, now, bad=op == "bad")
        elif op == "tick":
            now += n / 100
        elif op == "grow":
            plan.add_chunks(names[n % len(names)], {n % max(1, count)})
        elif op == "vanish":
            plan.remove_source(names[n % len(names)])
        elif op == "appear":
            plan.set_source(names[n % len(names)], ALL if n % 2 else {n % max(1, count)})
        active = [a for a in plan.running if now - a.started < stall]
        assert len(active) <= concurrency
        per_chunk: dict[int, list[Assignment]] = {}
        for a in plan.running:
            per_chunk.setdefault(a.chunk, []).append(a)
            assert a.chunk not in plan.held
        for runs in per_chunk.values():
            assert len(runs) <= 2
            if len(runs) == 2:  # a second copy only once the first stalled, and from elsewhere
                first, second = sorted(runs, key=lambda a: a.started)
                assert second.started - first.started >= stall and first.source != second.source
        for state in plan.sources.values():
            assert state.in_flight == sum(1 for a in plan.running if plan.sources.get(a.source) is state)
    # Liveness: with a reliable complete source, everything arrives.
    plan.set_source("reliable", ALL)
    for a in plan.running:
        plan.completed(a)
    now += 1000.0
    drain(plan, now)
    assert plan.done


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 40), holders=st.lists(st.sets(st.integers(0, 39), min_size=1), min_size=1, max_size=5),
       concurrency=st.integers(1, 8))
def test_every_chunk_some_source_holds_arrives_exactly_once(count: int, holders: list[set[int]],
                                                            concurrency: int) -> None:
    plan = FetchPlan(count, concurrency=concurrency)
    for i, chunks in enumerate(holders):
        plan.set_source(f"P{i}", chunks)
    got = drain(plan)
    reachable = {c for h in holders for c in h if c < count}
    assert sorted(c for c, _ in got) == sorted(reachable)
    assert plan.held == reachable
    assert plan.stuck() == (reachable != set(range(count)))
