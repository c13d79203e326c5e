"""The one bounded subscription queue (omx.fanout), as the event bus and membership use it."""

from __future__ import annotations

import asyncio

import pytest

from omx.fanout import Fanout, SubscriberLagged
from omx.mesh import MeshError


async def test_a_laggard_gets_its_owners_error_and_the_others_keep_reading() -> None:
    fanout: Fanout[int] = Fanout(lag_error=lambda: MeshError("fell behind"))
    fast, slow = fanout.subscribe(), fanout.subscribe(maxsize=1)
    for i in range(3):
        fanout.publish(i)
    assert [await fast.next(5) for _ in range(3)] == [0, 1, 2]
    assert await slow.next(5) == 0
    with pytest.raises(MeshError, match="fell behind"):
        await slow.next(5)
    with pytest.raises(MeshError):  # it stays ended
        await slow.next(5)
    assert slow.closed and fanout.subscribers == 1


async def test_ending_subscriptions_keeps_the_fanout_open_closing_does_not() -> None:
    fanout: Fanout[str] = Fanout()
    first = fanout.subscribe()
    fanout.end_subscriptions()
    with pytest.raises(StopAsyncIteration):
        await first.next(5)
    again = fanout.subscribe()
    fanout.publish("x")
    assert await again.next(5) == "x"
    fanout.close()
    assert [e async for e in again] == []
    late = fanout.subscribe()
    assert late.closed and [e async for e in late] == []


async def test_default_lag_error_and_a_wait_that_times_out() -> None:
    fanout: Fanout[int] = Fanout(default_maxsize=1)
    sub = fanout.subscribe()
    with pytest.raises(TimeoutError):
        await sub.next(0.05)
    fanout.publish(1)
    fanout.publish(2)
    assert await sub.next(5) == 1
    with pytest.raises(SubscriberLagged):
        await asyncio.wait_for(sub.__anext__(), 5)
