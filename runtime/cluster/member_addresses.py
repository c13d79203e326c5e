"""Where alive members answer, read from their Serf tags: peer endpoints (the transfer listener, else the API)
and HTTP/3. A member's transfer address is parsed once per tag set: routing asks for it on every forwarded call,
and parsing the tags was most of that cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omx.mesh.membership import Membership
from omx.runtime.peer.transport import h3_address, transfer_address

__all__ = ["MemberAddresses"]


class MemberAddresses:
    """Addresses of the alive members of ``membership()`` other than ``node_id`` (None: not alive or unknown)."""

    def __init__(self, node_id: str, membership: Callable[[], Membership | None]) -> None:
        self.node_id = node_id
        self._membership = membership
        self._peer: dict[str, tuple[Any, str | None]] = {}
        """Each member's transfer address with the tags it was read from."""

    def tags(self, node: str) -> Any:
        """An alive member's Serf tags (this node's too); None when it is not alive or unknown."""
        membership = self._membership()
        state = membership.view.get(node) if membership is not None else None
        return state.tags if state is not None and state.status == "alive" else None

    def peer(self, node: str) -> str | None:
        tags = self.tags(node) if node != self.node_id else None
        if tags is None:
            return None
        known = self._peer.get(node)
        if known is None or known[0] is not tags:
            known = self._peer[node] = (tags, transfer_address(tags))
        return known[1]

    def h3(self, node: str) -> str | None:
        tags = self.tags(node) if node != self.node_id else None
        return h3_address(tags) if tags is not None else None
