"""The event stream's messages for one subscriber: a snapshot, then changes.

An async iterator backed by a bounded bus subscription, so a consumer may
wait on it with a timeout (cancelling a wait loses nothing). A subscriber
that falls behind gets a fresh snapshot instead of the missed events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omx.runtime.cluster.records import message, snapshot_message
from omx.runtime.events import SubscriberLagged

if TYPE_CHECKING:
    from omx.runtime.cluster.service import ClusterService

__all__ = ["EventMessages"]


class EventMessages:
    """Messages of ``WS /api/distributed/events`` (without the ticks the handler adds)."""

    def __init__(self, service: ClusterService, maxsize: int = 1024) -> None:
        self._service = service
        self._maxsize = maxsize
        self._sub = service.bus.subscribe(maxsize)
        self._snapshot_due = True
        self._closed = False
        service._ws_opened(1)

    def __aiter__(self) -> EventMessages:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._snapshot_due:
                self._snapshot_due = False
                return snapshot_message(self._service.members())
            try:
                event = await self._sub.__anext__()
            except SubscriberLagged:
                self._sub = self._service.bus.subscribe(self._maxsize)
                self._snapshot_due = True
                continue
            except StopAsyncIteration:
                await self.aclose()
                raise
            msg = message(event)
            if msg is not None:
                return msg

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._sub.close()
            self._service._ws_opened(-1)
