"""The node's typed event bus.

Producers (the membership follower, the node-state monitor, the inventory
refresher) :meth:`EventBus.publish` frozen events; each subscriber reads its
own bounded queue (:mod:`omx.fanout`). A subscriber that falls behind is cut
off (its iteration ends with :class:`SubscriberLagged`); it resubscribes and
reads a fresh snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from omx.fanout import Fanout, SubscriberLagged
from omx.functions.cluster_view import NodeRecord

__all__ = [
    "Event",
    "EventBus",
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


class EventBus(Fanout[Event]):
    """Fan-out of node events to bounded subscriber queues."""
