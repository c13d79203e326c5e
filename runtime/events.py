"""The node's typed event bus.

Producers (the membership follower, the node-state monitor, the inventory
refresher) :meth:`EventBus.publish` frozen events; each subscriber reads its
own bounded queue. A subscriber that falls ``maxsize`` events behind is cut
off (its iteration ends with :class:`SubscriberLagged`) rather than slowing
the producers or growing memory; it resubscribes and reads a fresh snapshot.
Publishing never blocks and never awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from omx.functions.cluster_view import NodeRecord

__all__ = [
    "Event",
    "EventBus",
    "EventSubscription",
    "InventoryChanged",
    "MemberUpdate",
    "NodeStateChanged",
    "SubscriberLagged",
]

MemberChange = Literal["joined", "status", "updated", "removed"]


@dataclass(frozen=True)
class MemberUpdate:
    """A member joined, changed status, changed tags/inventory, or was removed."""

    change: MemberChange
    node: NodeRecord
    at: float


@dataclass(frozen=True)
class NodeStateChanged:
    """This node's health services changed (agent up/down, peer count)."""

    node_id: str
    state: Mapping[str, Any]
    at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", MappingProxyType(dict(self.state)))


@dataclass(frozen=True)
class InventoryChanged:
    """A node's inventory version changed (this node's, or a peer's once fetched)."""

    node_id: str
    version: str
    models: tuple[str, ...] = field(default=())
    at: float = 0.0


Event: TypeAlias = MemberUpdate | NodeStateChanged | InventoryChanged


class SubscriberLagged(Exception):
    """A subscriber fell too far behind and was cut off."""


_END = object()


class EventSubscription:
    """One subscriber's bounded queue; an async iterator of :data:`Event`."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._maxsize = maxsize
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._lagged = False
        self.closed = False

    def _push(self, event: Event) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._maxsize:
            self._lagged = True
            self.close()
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        """Stop receiving; a pending or later ``__anext__`` ends the iteration."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(_END)
            self._bus._subscribers.discard(self)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            if self._lagged:
                raise SubscriberLagged("event subscriber fell behind and was cut off")
            raise StopAsyncIteration
        return item  # type: ignore[return-value]


class EventBus:
    """Fan-out of node events to bounded subscriber queues."""

    def __init__(self, *, default_maxsize: int = 1024) -> None:
        self._subscribers: set[EventSubscription] = set()
        self._default_maxsize = default_maxsize
        self.closed = False

    def subscribe(self, maxsize: int | None = None) -> EventSubscription:
        """Receive every event published from now on."""
        sub = EventSubscription(self, maxsize or self._default_maxsize)
        if self.closed:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber (never blocks)."""
        for sub in list(self._subscribers):
            sub._push(event)

    def close(self) -> None:
        """End every subscription (node shutdown); later subscriptions end at once."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.close()
