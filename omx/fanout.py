"""Fan-out of events to bounded subscriber queues: the one subscription type of every layer.

A producer hands events to :meth:`Fanout.publish`; each subscriber reads its own queue as an async
iterator. A subscriber that falls ``maxsize`` events behind is cut off (its iteration
raises the fan-out's lag error, :class:`SubscriberLagged` unless the owner names another)
rather than slowing the producer or growing memory; it resubscribes and reads a fresh
snapshot. Publishing never blocks and never awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar, cast

__all__ = ["Fanout", "SubscriberLagged", "Subscription"]

T = TypeVar("T")

_END = object()


class SubscriberLagged(Exception):
    """A subscriber fell too far behind and was cut off."""


def _lagged() -> Exception:
    return SubscriberLagged("event subscriber fell behind and was cut off")


class Subscription(Generic[T]):
    """One subscriber's bounded queue; an async iterator of events, ended by :meth:`close`."""

    def __init__(self, fanout: Fanout[T], maxsize: int) -> None:
        self._fanout = fanout
        self._maxsize = maxsize
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._error: Exception | None = None
        self.closed = False

    def _push(self, event: T) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._maxsize:
            self._error = self._fanout._lag_error()
            self.close()
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        """Stop receiving; a pending or later ``__anext__`` ends the iteration."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(_END)
            self._fanout._subscribers.discard(self)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return cast(T, item)

    async def next(self, timeout_s: float) -> T:
        """The next event, or :class:`TimeoutError` after ``timeout_s``."""
        return await asyncio.wait_for(self.__anext__(), timeout_s)


class Fanout(Generic[T]):
    """Hands each published event to every current subscriber.

    ``lag_error`` makes the exception a cut-off subscriber's iteration raises.
    """

    def __init__(self, *, default_maxsize: int = 1024, lag_error: Callable[[], Exception] = _lagged) -> None:
        self._subscribers: set[Subscription[T]] = set()
        self._default_maxsize = default_maxsize
        self._lag_error = lag_error
        self.closed = False

    def subscribe(self, maxsize: int | None = None) -> Subscription[T]:
        """Receive every event published from now on (ended at once after :meth:`close`)."""
        sub = Subscription(self, maxsize or self._default_maxsize)
        if self.closed:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: T) -> None:
        """Hand ``event`` to every subscriber (never blocks)."""
        for sub in list(self._subscribers):
            sub._push(event)

    def end_subscriptions(self) -> None:
        """End every current subscription; later ones work as usual."""
        for sub in list(self._subscribers):
            sub.close()

    def close(self) -> None:
        """End every subscription; later subscriptions end at once (shutdown)."""
        self.closed = True
        self.end_subscriptions()
