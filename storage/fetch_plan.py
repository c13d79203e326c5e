"""Which chunk to fetch from which source next: the pure planner of a blob transfer.

A :class:`FetchPlan` knows how many chunks the blob has, which ones are already
held, and which chunks each source can serve (a set of chunk numbers, or
:data:`ALL` for a source holding the whole blob). The transfer driver asks it
for :meth:`~FetchPlan.assign` whenever something changed and reports each
outcome back (:meth:`~FetchPlan.completed`, :meth:`~FetchPlan.failed`). The
plan does no I/O and reads no clock: every decision takes ``now``.

Rules:

* at most ``concurrency`` assignments run at once (stalled ones do not count);
* the :data:`LOCAL` source (chunks copied from a blob already on this node) is
  used first for every chunk it has; peers are given the **rarest** chunk they
  hold (fewest usable sources), lowest chunk number first among equals (with
  :meth:`~FetchPlan.share`, the node's share first), and the least busy source
  takes the next slot (among equally busy ones, the one with the rarest chunk
  to give: a source that holds everything keeps being asked for what nobody
  else has), so every source stays busy;
* a chunk is never fetched from two sources at once, unless its assignment has
  run for ``stall_timeout`` seconds: then one duplicate from another source is
  allowed, and whichever finishes first wins (:meth:`~FetchPlan.completed`
  returns the assignments the driver should cancel);
* a source that sent a bad chunk (it failed verification) is penalised: after
  ``max_bad`` bad chunks it is banned for the rest of the transfer; a chunk
  that failed is re-queued and prefers another source;
* a source that failed for other reasons (network) rests for an exponential
  backoff, and after ``max_failures`` consecutive failures it is dropped (the
  driver may add it back with :meth:`~FetchPlan.set_source`);
* sources may appear, vanish and grow at any time (a swarm peer that is still
  downloading the same blob announces more chunks as it gets them).

:meth:`~FetchPlan.stuck` tells the driver when nothing can progress (missing
chunks that no usable source holds, nothing in flight, nobody resting).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, final

__all__ = ["ALL", "LOCAL", "AllChunks", "Assignment", "Availability", "FetchPlan", "SourceState"]

LOCAL: Final = "local"
"""The source name of chunks copied from blobs this node already holds."""


@final
class AllChunks:
    """Availability of a source that holds the complete blob."""

    __slots__ = ()

    def __contains__(self, _chunk: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALL"


ALL: Final = AllChunks()
Availability = AllChunks | frozenset[int]


@dataclass(frozen=True)
class Assignment:
    """Fetch ``chunk`` from ``source``; handed out at ``started``."""

    chunk: int
    source: str
    started: float


@dataclass
class SourceState:
    """What the plan knows about one source (read-only for callers)."""

    chunks: Availability
    in_flight: int = 0
    assigned: int = 0
    delivered: int = 0
    bad: int = 0
    failures: int = 0
    """Consecutive non-verification failures (reset by a delivered chunk)."""
    rest_until: float = 0.0
    banned: bool = False
    dropped: bool = False
    failed_chunks: set[int] = field(default_factory=set)
    """Chunks that failed from this source; another source is preferred for them."""

    def holds(self, chunk: int) -> bool:
        return chunk in self.chunks

    def usable(self, now: float) -> bool:
        return not self.banned and not self.dropped and now >= self.rest_until


class FetchPlan:
    """The state of one blob transfer's schedule (see the module docstring)."""

    def __init__(
        self,
        chunk_count: int,
        held: Iterable[int] = (),
        *,
        concurrency: int = 3,
        stall_timeout: float = 30.0,
        max_bad: int = 3,
        max_failures: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        if chunk_count < 0 or concurrency < 1 or stall_timeout <= 0 or max_bad < 1 or max_failures < 1:
            raise ValueError("invalid fetch plan settings")
        self.chunk_count = chunk_count
        self.concurrency = concurrency
        self.stall_timeout = stall_timeout
        self.max_bad = max_bad
        self.max_failures = max_failures
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.held: set[int] = {i for i in held if 0 <= i < chunk_count}
        self.sources: dict[str, SourceState] = {}
        self._running: dict[int, list[Assignment]] = {}
        self._order: list[int] = []
        self._rarity: dict[int, int] = {}
        self._share = (0, chunk_count)
        """This node's run of chunks (see :meth:`share`); all of them when it fetches alone."""
        self._spread_order: dict[int, tuple[bool, int, int]] = {}
        """The order in which the chunks outside the share are taken (see :meth:`share`)."""
        self._dirty = True

    # ------------------------------------------------------------ sources

    def set_source(self, source: str, chunks: Availability | Iterable[int]) -> None:
        """Add a source or replace what it holds (a dropped source comes back; a banned one stays banned)."""
        avail: Availability = chunks if isinstance(chunks, AllChunks) else frozenset(
            i for i in chunks if 0 <= i < self.chunk_count)
        state = self.sources.get(source)
        if state is None:
            self.sources[source] = SourceState(avail)
        else:
            state.chunks = avail
            if state.dropped:
                state.dropped, state.failures, state.rest_until = False, 0, 0.0
        self._dirty = True

    def share(self, rank: int, together: int) -> None:
        """This node is number ``rank`` of ``together`` fetching the blob at the same time.

        The chunks are cut into ``together`` equal runs, one per node. Among equally rare
        chunks this node takes its own run first, in order, so the nodes ask the sources
        that hold everything for different chunks and trade them. Then it helps with the
        other runs from their ends, backwards (their owners come there last), each helper
        with its own stripe (the ``j``-th chunk from a run's end goes first to the helper
        ``1 + j % (together - 1)`` places after its owner), so helpers race neither the
        owner chunk for chunk nor each other. A source that holds everything is asked for
        a chunk outside the run only while nothing else of this node's runs there.
        """
        if not 0 <= rank < together:
            raise ValueError("rank must be between 0 and together - 1")
        count = self.chunk_count
        bounds = [count * k // together for k in range(together + 1)]
        self._share = (bounds[rank], bounds[rank + 1])
        self._spread_order = {}
        for k in range(together):
            if k == rank:
                continue
            distance = (rank - k) % together
            for i in range(bounds[k], bounds[k + 1]):
                from_end = bounds[k + 1] - 1 - i
                self._spread_order[i] = (from_end % (together - 1) != distance - 1, from_end, distance)
        self._dirty = True

    def add_chunks(self, source: str, chunks: Iterable[int]) -> None:
        """A swarm source got more chunks."""
        state = self.sources.get(source)
        if state is None:
            self.set_source(source, chunks)
        elif not isinstance(state.chunks, AllChunks):
            self.set_source(source, state.chunks | frozenset(chunks))

    def remove_source(self, source: str) -> list[Assignment]:
        """The source vanished: forget it; returns its running assignments (now re-queued)."""
        state = self.sources.pop(source, None)
        if state is None:
            return []
        lost = []
        for chunk, runs in list(self._running.items()):
            mine = [a for a in runs if a.source == source]
            if mine:
                lost.extend(mine)
                self._drop_runs(chunk, mine)
        self._dirty = True
        return lost

    # ------------------------------------------------------------ queries

    @property
    def done(self) -> bool:
        return len(self.held) == self.chunk_count

    @property
    def missing(self) -> set[int]:
        return set(range(self.chunk_count)) - self.held

    @property
    def running(self) -> list[Assignment]:
        return [a for runs in self._running.values() for a in runs]

    def availability(self, chunk: int) -> int:
        """How many sources able to serve (now or after a rest) hold ``chunk``."""
        return sum(1 for s in self.sources.values() if s.holds(chunk) and not s.banned and not s.dropped)

    def unavailable(self) -> set[int]:
        """Missing chunks that no source able to serve (now or after a rest) holds."""
        alive = [s for s in self.sources.values() if not s.banned and not s.dropped]
        return {i for i in self.missing if not any(s.holds(i) for s in alive)}

    def stuck(self) -> bool:
        """True when nothing can progress: nothing runs and no source (resting ones included)
        holds any missing chunk. A swarm source that grows (:meth:`add_chunks`) unsticks it."""
        if self.done or self._running:
            return False
        return self.unavailable() == self.missing

    def next_wakeup(self, now: float) -> float | None:
        """When the plan may hand out something new by the clock alone (a rest ends, a run stalls)."""
        times = [s.rest_until for s in self.sources.values()
                 if not s.banned and not s.dropped and s.rest_until > now]
        for runs in self._running.values():
            if len(runs) == 1:
                times.append(runs[0].started + self.stall_timeout)
        future = [t for t in times if t > now]
        return min(future) if future else None

    # ------------------------------------------------------------ decisions

    def _active(self, now: float) -> int:
        return sum(1 for runs in self._running.values() for a in runs
                   if now - a.started < self.stall_timeout)

    def _usable_sources(self, now: float) -> list[tuple[str, SourceState]]:
        found = [(n, s) for n, s in self.sources.items() if s.usable(now)]
        # The least busy first; then the one given least so far; then by name (deterministic).
        found.sort(key=lambda item: (item[0] != LOCAL, item[1].in_flight, item[1].assigned, item[0]))
        return found

    def _rebuild(self) -> None:
        queued = [i for i in range(self.chunk_count) if i not in self.held and i not in self._running]
        alive = [s for s in self.sources.values() if not s.banned and not s.dropped]
        rarity = {i: sum(1 for s in alive if s.holds(i)) for i in queued}
        start, end = self._share
        queued.sort(key=lambda i: (rarity[i], False, i, 0, 0) if start <= i < end
                    else (rarity[i], True, *self._spread_order[i]))
        self._order = queued
        self._rarity = rarity
        self._dirty = False

    def _candidate(self, source: SourceState, now: float) -> int | None:
        """Position in the queue of the chunk ``source`` should fetch next, or None."""
        if self._dirty:
            self._rebuild()
        start, end = self._share
        only_share = isinstance(source.chunks, AllChunks) and source.in_flight > 0
        fallback = None
        for pos, chunk in enumerate(self._order):
            if not source.holds(chunk) or (only_share and not start <= chunk < end):
                continue
            if chunk not in source.failed_chunks:
                return pos
            if fallback is None and not self._others_hold(chunk, source, now):
                fallback = pos
        return fallback

    def _others_hold(self, chunk: int, source: SourceState, now: float) -> bool:
        return any(s is not source and s.usable(now) and s.holds(chunk) and chunk not in s.failed_chunks
                   for s in self.sources.values())

    def assign(self, now: float) -> list[Assignment]:
        """Hand out new assignments up to the concurrency limit (may be empty)."""
        out: list[Assignment] = []
        while self._active(now) < self.concurrency:
            picked = self._pick_queued(now) or self._pick_stalled(now)
            if picked is None:
                break
            out.append(picked)
        return out

    def _pick_queued(self, now: float) -> Assignment | None:
        best: tuple[tuple[bool, int, int], int, str, SourceState] | None = None
        for name, state in self._usable_sources(now):
            pos = self._candidate(state, now)
            if pos is not None:
                key = (name != LOCAL, state.in_flight, self._rarity[self._order[pos]])
                if best is None or key < best[0]:
                    best = (key, pos, name, state)
        if best is None:
            return None
        _, pos, name, state = best
        return self._start(self._order.pop(pos), name, state, now)

    def _pick_stalled(self, now: float) -> Assignment | None:
        stalled = sorted((runs[0].started, chunk) for chunk, runs in self._running.items()
                         if len(runs) == 1 and now - runs[0].started >= self.stall_timeout)
        for _, chunk in stalled:
            busy = self._running[chunk][0].source
            for name, state in self._usable_sources(now):
                if name != busy and state.holds(chunk):
                    return self._start(chunk, name, state, now)
        return None

    def _start(self, chunk: int, name: str, state: SourceState, now: float) -> Assignment:
        a = Assignment(chunk, name, now)
        self._running.setdefault(chunk, []).append(a)
        state.in_flight += 1
        state.assigned += 1
        return a

    # ------------------------------------------------------------ outcomes

    def _drop_runs(self, chunk: int, runs: list[Assignment]) -> None:
        current = self._running.get(chunk, [])
        for a in runs:
            if a in current:
                current.remove(a)
                state = self.sources.get(a.source)
                if state is not None:
                    state.in_flight -= 1
        if not current:
            self._running.pop(chunk, None)
            if chunk not in self.held:
                self._dirty = True

    def completed(self, a: Assignment) -> list[Assignment]:
        """``a`` delivered a verified chunk; returns duplicate assignments of it to cancel."""
        others = [x for x in self._running.get(a.chunk, []) if x != a]
        self.held.add(a.chunk)
        self._drop_runs(a.chunk, [a, *others])
        state = self.sources.get(a.source)
        if state is not None:
            state.delivered += 1
            state.failures = 0
        return others

    def mark_held(self, chunk: int) -> None:
        """A chunk arrived by other means (e.g. written by another transfer of the same blob)."""
        self.held.add(chunk)
        self._dirty = True

    def failed(self, a: Assignment, now: float, *, bad: bool) -> None:
        """``a`` did not deliver. ``bad``: it delivered data that failed verification (penalised)."""
        self._drop_runs(a.chunk, [a])
        state = self.sources.get(a.source)
        if state is None:
            return
        state.failed_chunks.add(a.chunk)
        if bad:
            state.bad += 1
            if state.bad >= self.max_bad:
                state.banned = True
        else:
            state.failures += 1
            if state.failures >= self.max_failures:
                state.dropped = True
            else:
                state.rest_until = now + min(self.max_backoff, self.backoff * 2 ** (state.failures - 1))
        self._dirty = True

    def cancelled(self, a: Assignment) -> None:
        """The driver gave ``a`` up without a verdict (e.g. a duplicate that lost the race)."""
        self._drop_runs(a.chunk, [a])

    def summary(self) -> Mapping[str, Mapping[str, int | bool]]:
        """Per-source counters (for progress reports and logs)."""
        return {n: {"delivered": s.delivered, "bad": s.bad, "in_flight": s.in_flight, "banned": s.banned,
                    "dropped": s.dropped} for n, s in self.sources.items()}
