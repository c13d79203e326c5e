"""The sequences of a batching context and the choices made about them (pure logic, no llama.cpp).

A :class:`Slot` is one sequence of the context and the tokens its KV cells
hold. The decode loop (:mod:`._batch_backend`) asks this module which free
sequence a new request takes (:func:`choose_slot`) and, with one cache shared
by all sequences (``kv_unified``), which idle sequences give their cached cells
back when a request needs room (:func:`cells_to_free`) and which running
request steps aside when the cache is full (:func:`preemption_victim`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Slot", "cells_to_free", "cells_used", "choose_slot", "common_prefix", "preemption_victim", "runs"]


class Slot:
    """One sequence of the context and the tokens its cache cells hold."""

    __slots__ = ("cached", "gen", "seq", "used")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []
        self.gen: Any = None
        """The request generating on this sequence (a :class:`~._sequence.Generation`), None when free."""
        self.used = 0
        """When a request last took it (a counter: larger is more recent)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def runs(seqs: Iterable[int]) -> int:
    """How many runs of consecutive ids ``seqs`` make.

    With a cache per sequence llama.cpp puts only consecutive sequence ids in one
    micro-batch (``split_equal``, "accept only increasing sequence ids"), and each
    micro-batch is a forward pass of its own: busy sequences 0, 3, 5 and 6 decode
    their next tokens in three passes instead of one.
    """
    ordered = sorted(seqs)
    return sum(1 for i, seq in enumerate(ordered) if i == 0 or seq != ordered[i - 1] + 1)


def choose_slot(free: Sequence[Slot], busy: Sequence[int], tokens: Sequence[int]) -> Slot:
    """The free sequence for a request with prompt ``tokens`` while sequences ``busy`` generate.

    First the one that keeps the busy sequences in the fewest runs (:func:`runs`;
    4 streams of Gemma 3 270M spread over 8 sequences ran at 1.49x one stream,
    packed together about 2x), then the longest cached prefix of the prompt,
    then the least recently used.
    """
    return max(free, key=lambda s: (-runs([*busy, s.seq]), common_prefix(s.cached, tokens), -s.used))


def cells_used(slots: Iterable[Slot]) -> int:
    """Cache cells the sequences hold (running requests' and idle sequences' cached prefixes)."""
    return sum(len(slot.cached) for slot in slots)


def cells_to_free(slots: Sequence[Slot], total: int, need: int, keep: Slot | None = None) -> list[Slot] | None:
    """Idle sequences whose cached prefixes to drop, least recently used first, so ``need`` cells are free.

    ``keep`` (the sequence a request is about to take, for its prefix) is never
    dropped. None when dropping every other idle prefix would still not free
    ``need`` cells.
    """
    free = total - cells_used(slots)
    drops: list[Slot] = []
    for slot in sorted((s for s in slots if s.gen is None and s.cached and s is not keep), key=lambda s: s.used):
        if free >= need:
            break
        drops.append(slot)
        free += len(slot.cached)
    return drops if free >= need else None


def preemption_victim(slots: Sequence[Slot]) -> Slot | None:
    """The running request to set aside when the shared cache is full: the one admitted last.

    Never the one admitted first, so the oldest request always progresses (it
    fits alone: a request's context is at most ``num_ctx`` cells, the cache
    ``num_ctx × num_parallel``). None when fewer than two requests run.
    """
    running = sorted((s for s in slots if s.gen is not None), key=lambda s: s.used)
    return running[-1] if len(running) > 1 else None
