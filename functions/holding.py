"""The holding queue: model-routed requests waiting for a free slot anywhere in the cluster.

When every holder of a request's model is at capacity (all its slots taken, by
this node's estimate of the loads), the router does not push the request into
one node's queue: the request waits here, on the node that took it in, until a
slot frees on any holder, then goes there. Waiters of one model are served in
arrival order: only the first re-checks the loads; when it leaves (with a slot
or not) the next one checks at once. A wait is bounded twice: at most
``max_waiting`` requests wait on a node (more are refused at once), and each
waits ``timeout_s`` at most; both end in 503 with ``Retry-After``.

The router calls :meth:`HoldingQueue.changed` whenever a slot may have freed:
a local request ended, a forwarded one ended, a peer's load report arrived
(``X-Omx-Load`` or the periodic exchange). The first waiter also re-checks every
``tick_s``, which lets the router poll loads that are getting old and notice new
holders (a replica added for demand).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from omx.errors import ServiceBusy

__all__ = ["DEFAULT_TICK_S", "HoldingQueue"]

T = TypeVar("T")

DEFAULT_TICK_S = 0.25
"""How often the first waiter of a model re-checks the loads without being woken."""


class _Waiter:
    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()


class HoldingQueue:
    """Requests waiting for a free slot, per model key (see the module docstring)."""

    def __init__(self, *, timeout_s: float = 30.0, max_waiting: int = 512, tick_s: float = DEFAULT_TICK_S,
                 clock: Callable[[], float] | None = None) -> None:
        if timeout_s < 0 or max_waiting < 1 or tick_s <= 0:
            raise ValueError("timeout_s must be >= 0, max_waiting >= 1 and tick_s > 0")
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.tick_s = tick_s
        self._clock = clock
        self._queues: dict[str, deque[_Waiter]] = {}
        self.total = 0
        """Requests waiting now, all models together."""
        self.held = 0
        """Requests that ever waited here."""
        self.timed_out = 0
        """Requests that waited ``timeout_s`` without a slot (503)."""

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def waiting(self, key: str) -> int:
        """Requests for model ``key`` waiting now."""
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def by_model(self) -> dict[str, int]:
        return {k: len(q) for k, q in self._queues.items() if q}

    def changed(self) -> None:
        """A slot may have freed somewhere: the first waiter of every model looks again."""
        for queue in self._queues.values():
            if queue:
                queue[0].event.set()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def wait(self, key: str, ready: Callable[[], T | None], *, on_tick: Callable[[], None] | None = None,
                   retry_after: Callable[[], int] = lambda: 1) -> T:
        """Wait in ``key``'s line until ``ready()`` answers (returned), or raise :class:`ServiceBusy`.

        ``ready`` is only asked when this request is first in line; ``on_tick``
        runs each time the first waiter looks without a slot (the router asks for
        fresh loads and a replica there).
        """
        if self.total >= self.max_waiting:
            raise ServiceBusy(f"{self.total} requests are already waiting for a free slot on this node",
                              retry_after=retry_after())
        queue = self._queues.setdefault(key, deque())
        me = _Waiter()
        queue.append(me)
        self.total += 1
        self.held += 1
        deadline = self._now() + self.timeout_s
        try:
            while True:
                first = queue[0] is me
                if first:
                    found = ready()
                    if found is not None:
                        return found
                    if on_tick is not None:
                        on_tick()
                left = deadline - self._now()
                if left <= 0:
                    self.timed_out += 1
                    raise ServiceBusy(f"every node holding the model stayed busy for {self.timeout_s:g} s "
                                      "(routing.queue_timeout)", retry_after=retry_after())
                me.event.clear()
                try:
                    await asyncio.wait_for(me.event.wait(), min(left, self.tick_s) if first else left)
                except TimeoutError:
                    pass
        finally:
            queue.remove(me)
            self.total -= 1
            if queue:
                queue[0].event.set()  # the next in line looks now (another slot may be free as well)
            elif self._queues.get(key) is queue:
                del self._queues[key]
