"""The membership service: agent + RPC stream + pure view, with subscribers.

``Membership`` owns nothing but wiring: it subscribes to Serf's member and
user events, folds them into the :class:`MembershipView` with
:func:`omx.mesh.view.apply`, and hands each subscriber the resulting
:class:`MemberChanged` events and :class:`UserEvent` s. After an agent crash
it waits for the supervisor's restart, resubscribes and resynchronises from
a full member snapshot, so subscribers never miss a net change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

from omx.fanout import Fanout, Subscription
from omx.mesh.agent import SerfAgent
from omx.mesh.errors import MeshError, SerfConnectionError, SerfRPCError
from omx.mesh.records import MemberEvent, UserEvent
from omx.mesh.view import MemberChanged, MembershipView, MemberState, Snapshot, apply, diff

__all__ = ["Membership", "MembershipEvent", "Subscription"]

log = logging.getLogger(__name__)

MembershipEvent: TypeAlias = MemberChanged | UserEvent
_STREAM_FILTER = "member-join,member-leave,member-failed,member-update,member-reap,user"


class Membership:
    """Cluster membership as seen by this node's Serf agent.

    ``clock`` stamps view changes (inject a fake in tests).
    """

    def __init__(self, agent: SerfAgent, *, clock: Callable[[], float] = time.time,
                 resync_timeout_s: float = 60.0) -> None:
        self.agent = agent
        self._clock = clock
        self._resync_timeout_s = resync_timeout_s
        self._view = MembershipView()
        self._fanout: Fanout[MembershipEvent] = Fanout(lag_error=lambda: MeshError(
            "membership subscriber fell behind; resubscribe and read the view"))
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    @property
    def view(self) -> MembershipView:
        """The current, immutable view."""
        return self._view

    def members(self) -> tuple[MemberState, ...]:
        """Every known member, sorted by name."""
        return tuple(m for _, m in sorted(self._view.members.items()))

    def subscribe(self, maxsize: int = 1024) -> Subscription[MembershipEvent]:
        """Receive every change from now on (read :attr:`view` for the state so far).

        A subscriber that falls ``maxsize`` events behind is cut off: iteration raises :class:`MeshError`.
        """
        return self._fanout.subscribe(maxsize)

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start the agent if needed and wait until the first snapshot is in the view."""
        if self.agent.pid is None:
            await self.agent.start()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="membership")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        except TimeoutError as exc:
            raise MeshError(f"membership did not synchronise within {timeout_s:g}s") from exc

    async def stop(self, leave: bool = True) -> None:
        """Stop following the agent and stop it (leaving the cluster when ``leave``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.agent.stop(graceful=leave)
        self._fanout.end_subscriptions()

    async def join(self, addrs: Sequence[str]) -> int:
        """Join the cluster through ``addrs``; returns how many answered."""
        return await self.agent.join(addrs)

    async def leave(self) -> None:
        """Leave the cluster gracefully; the agent stops and is not restarted."""
        await self.stop(leave=True)

    async def update_tags(self, set: Mapping[str, str] | None = None,  # noqa: A002
                          delete: Sequence[str] = ()) -> None:
        """Change this node's tags (size-checked); peers see a member-update."""
        await self.agent.set_tags(set, delete)

    async def user_event(self, name: str, payload: bytes = b"", coalesce: bool = True) -> None:
        """Broadcast a user event."""
        await self.agent.rpc.user_event(name, payload, coalesce)

    # ------------------------------------------------------------ internals

    def _set_view(self, view: MembershipView) -> None:
        changes = diff(self._view, view)
        self._view = view
        for change in changes:
            self._publish(change)

    def _publish(self, event: MembershipEvent) -> None:
        self._fanout.publish(event)

    async def _run(self) -> None:
        while True:
            try:
                await self.agent.wait_ready(self._resync_timeout_s)
                stream = await self.agent.rpc.stream(_STREAM_FILTER)
                try:
                    # Subscribe first, then snapshot: nothing can fall between the two.
                    members = await self.agent.rpc.members()
                    self._set_view(apply(self._view, Snapshot(tuple(members)), self._clock()))
                    self._synced.set()
                    async for event in stream:
                        if isinstance(event, MemberEvent):
                            self._set_view(apply(self._view, event, self._clock()))
                        elif isinstance(event, UserEvent):
                            self._publish(event)
                finally:
                    await stream.aclose()
            except (SerfConnectionError, SerfRPCError, MeshError) as exc:
                log.info("membership stream interrupted: %s; resynchronising", exc)
                await asyncio.sleep(0.2)
