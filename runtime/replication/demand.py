"""Replicas that follow demand: the router's :class:`~omx.functions.router.DemandSink`.

The router tells this node's :class:`DemandReplicas` whenever requests for a
model wait in its holding queue on every holder (see
:mod:`omx.functions.holding`). It picks the node to copy the model to with the
pure :func:`~omx.functions.demand.demand_target` (an alive, idle node with
room, while the model has fewer than ``replication.max_factor`` holders) and
asks it to fetch the model with the ``demand`` origin through the peer
replication endpoint (``POST /api/peer/replication/fetch``), peer to peer from
every holder, as migrations do; when the target is this node it fetches
itself. Once the copy is complete this node re-reads the target's inventory at
once, so its waiting requests go there without waiting for gossip.

One copy per model at a time from this node, and after a failed one the model
is left alone for ``retry_s``. Several entry nodes that overflow together ask
the same node (the rendezvous choice), which joins their requests into one
transfer; a node that already holds the model answers at once. Placement keeps
a ``demand`` copy while it is used and drops it ``replication.idle_after``
after its last request, never below the model's factor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from omx.errors import OmxError
from omx.functions.demand import DemandCopy, demand_target
from omx.functions.routing import Holders, NodeLoad
from omx.runtime.replication.link import FETCH_PATH
from omx.runtime.replication.replicator import Replicator
from omx.types import NodeId

__all__ = ["DemandReplicas", "DemandStats"]

log = logging.getLogger("omx.demand")

RETRY_S = 30.0
"""After a failed demand copy of a model, this node asks for another only after this long."""
CHECK_S = 0.5
"""A model that found no node to copy to is looked at again after this long at the earliest."""


@dataclass
class DemandStats:
    """Demand copies this node asked for: started, completed, failed."""

    started: int = 0
    completed: int = 0
    failed: int = 0


class DemandReplicas:
    """Adds a ``demand`` copy of a model that is busy everywhere (see the module docstring)."""

    def __init__(self, replicator: Replicator, load_of: Callable[[NodeId], NodeLoad | None], *, max_factor: int,
                 retry_s: float = RETRY_S, clock: Callable[[], float] = time.time) -> None:
        self.r = replicator
        self.load_of = load_of
        """A member's load as the router knows it (None: unknown, so not idle)."""
        self.max_factor = max_factor
        self.retry_s = retry_s
        self.clock = clock
        self._running: dict[str, asyncio.Task[object]] = {}
        self._failed_at: dict[str, float] = {}
        self._checked_at: dict[str, float] = {}
        self.stats = DemandStats()

    def idle(self, node: NodeId) -> bool:
        load = self.load_of(node)
        return load is not None and load.busy == 0

    def overflow(self, holders: Holders) -> None:
        """Requests for ``holders.key`` wait on every holder: start a copy where one fits (never blocks)."""
        key = holders.key
        if self.max_factor <= 1 or key in self._running or len(holders.alive) >= self.max_factor:
            return
        now = self.clock()
        if now < self._failed_at.get(key, float("-inf")) + self.retry_s:
            return
        if now < self._checked_at.get(key, float("-inf")) + CHECK_S:
            return  # the router asks at every freed slot: planning over the whole cluster each time is waste
        self._checked_at[key] = now
        copy = demand_target(self.r.link.cluster_snapshot(), key, idle=self.idle, max_factor=self.max_factor,
                             now=now)
        if copy is None:
            return
        self.stats.started += 1
        log.info("%s is busy on every holder (%s): copying it to %s", copy.name, ", ".join(copy.holders), copy.node)
        task = self.r.spawn(self._add(copy), f"demand-{copy.name}")
        self._running[key] = task
        task.add_done_callback(lambda _t: self._running.pop(key, None))

    async def _add(self, copy: DemandCopy) -> None:
        try:
            if copy.node == self.r.node_id:
                fetch = self.r.start_fetch(copy.name, copy.digest, "demand", copy.holders)
                await self.r.wait_fetch(fetch)
            else:
                doc = {"model": copy.name, "digest": copy.digest, "origin": "demand"}
                async for _progress in self.r.commands.stream(copy.node, FETCH_PATH, doc):
                    pass
                await self.r.link.refresh_peer(copy.node)
        except Exception as exc:  # noqa: BLE001 - a failed copy is retried after retry_s, never fatal
            self.stats.failed += 1
            self._failed_at[copy.key] = self.clock()
            reason = exc.message if isinstance(exc, OmxError) else f"internal error: {type(exc).__name__}"
            log.warning("demand copy of %s to %s failed: %s", copy.name, copy.node, reason)
            return
        self.stats.completed += 1
        log.info("demand copy of %s on %s is complete", copy.name, copy.node)
