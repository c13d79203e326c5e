"""The holding queue and replicas that follow demand, with in-memory peers: who waits, who goes, where a copy goes."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from omx.errors import PeerError, ServiceBusy
from omx.functions.call import Call
from omx.functions.demand import demand_target
from omx.functions.holding import HoldingQueue
from omx.functions.routing import Holders, ModelLoad, NodeLoad, has_room
from omx.runtime.replication.demand import DemandReplicas
from omx.storage.holdings import Incoming
from omx.types import NodeId
from tests.support.placement import GB, cluster, holdings, model
from tests.test_router import A, B, C, FakeReply, body, call, make, spec

pytestmark = pytest.mark.timeout(20)

KEY = "tiny:latest"


# ------------------------------------------------------------------ pure parts


def test_a_node_has_room_while_its_requests_are_fewer_than_its_slots() -> None:
    assert has_room(None)
    assert has_room(ModelLoad(True, 1, 0, 2))
    assert not has_room(ModelLoad(True, 2, 0, 2))
    assert not has_room(ModelLoad(False, 0, 1, 1))


def idle_except(*busy: str) -> Any:
    return lambda node: node not in busy


def test_demand_picks_an_idle_node_with_room_by_rendezvous_rank() -> None:
    snap = cluster({"a": holdings(model("m")), "b": holdings(), "c": holdings(), "d": holdings(free=GB // 2)})
    copy = demand_target(snap, "m:latest", idle=idle_except(), max_factor=4, now=0.0)
    assert copy is not None and copy.node in {"b", "c"} and copy.holders == ("a",) and copy.bytes > GB
    other = "c" if copy.node == "b" else "b"
    assert demand_target(snap, "m:latest", idle=idle_except(copy.node), max_factor=4, now=0.0).node == other  # type: ignore[union-attr]
    assert demand_target(snap, "m:latest", idle=idle_except("b", "c"), max_factor=4, now=0.0) is None  # d: no room


def test_demand_adds_nothing_at_max_factor_while_a_copy_is_on_its_way_or_over_a_users_model() -> None:
    two = cluster({"a": holdings(model("m")), "b": holdings(model("m", origin="replica")), "c": holdings()})
    assert demand_target(two, "m:latest", idle=idle_except(), max_factor=2, now=0.0) is None
    assert demand_target(two, "m:latest", idle=idle_except(), max_factor=3, now=0.0).node == "c"  # type: ignore[union-attr]
    m = model("m")
    coming = cluster({"a": holdings(m), "b": holdings(incoming=[Incoming(m.name, m.digest, "demand", 0.0, 0.0)]),
                      "c": holdings()})
    assert demand_target(coming, "m:latest", idle=idle_except(), max_factor=4, now=0.0) is None
    users = cluster({"a": holdings(model("m", version=2)), "b": holdings(model("m", version=1))})
    assert demand_target(users, "m:latest", idle=idle_except(), max_factor=4, now=0.0) is None
    assert demand_target(users, "nothing:latest", idle=idle_except(), max_factor=4, now=0.0) is None


async def test_waiters_go_in_arrival_order_and_time_out_with_retry_after() -> None:
    queue = HoldingQueue(timeout_s=5.0, max_waiting=3, tick_s=0.01)
    slots = [0]
    order: list[int] = []

    def ready(i: int) -> Any:
        def check() -> int | None:
            if slots[0] > 0:
                slots[0] -= 1
                order.append(i)
                return i
            return None
        return check

    waiters = [asyncio.create_task(queue.wait(KEY, ready(i))) for i in range(3)]
    await asyncio.sleep(0.05)
    assert queue.waiting(KEY) == 3 and not order
    with pytest.raises(ServiceBusy):  # a fourth is refused at once: the queue is bounded
        await queue.wait(KEY, ready(9), retry_after=lambda: 7)
    slots[0] = 2
    queue.changed()
    assert await asyncio.gather(waiters[0], waiters[1]) == [0, 1]
    short = HoldingQueue(timeout_s=0.05, tick_s=0.01)
    with pytest.raises(ServiceBusy) as info:
        await short.wait(KEY, lambda: None, retry_after=lambda: 4)
    assert info.value.retry_after == 4 and short.timed_out == 1 and short.waiting(KEY) == 0
    slots[0] = 1
    queue.changed()
    assert await waiters[2] == 2 and order == [0, 1, 2] and queue.total == 0


# ------------------------------------------------------------------ the router holds


class Sink:
    def __init__(self) -> None:
        self.seen: list[Holders] = []

    def overflow(self, holders: Holders) -> None:
        self.seen.append(holders)


def gated(gate: asyncio.Event, ran: list[str]) -> Any:
    async def handler(_body: Any, _call: Call) -> dict[str, Any]:
        ran.append("start")
        await gate.wait()
        ran.append("end")
        return {"ran": "here"}
    return handler


async def test_a_call_waits_while_every_holder_is_full_and_runs_where_a_slot_frees() -> None:
    router, link, _, _ = make({A: True, B: True, C: False})
    router.holding = HoldingQueue(timeout_s=30, tick_s=0.01)
    router.demand = sink = Sink()
    router.book.report(B, NodeLoad.of({KEY: ModelLoad(True, 1, 1, 1)}, num_parallel=1), router.clock())
    gate, ran = asyncio.Event(), []
    handler = spec(gated(gate, ran))
    first = asyncio.create_task(router.serve(handler, body(), call(router)))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(router.serve(handler, body(), call(router)))
    await asyncio.sleep(0.05)
    assert ran == ["start"] and router.holding.waiting(KEY) == 1  # A's one slot is taken, B reports full
    assert sink.seen and sink.seen[0].key == KEY and set(sink.seen[0].alive) == {A, B}
    assert not link.sent  # nothing was pushed into B's queue
    gate.set()
    assert await first == {"ran": "here"} and await second == {"ran": "here"}
    assert ran == ["start", "end", "start", "end"] and router.holding.held == 1


async def test_a_held_call_goes_to_a_peer_whose_report_shows_a_free_slot() -> None:
    router, link, _, _ = make({A: True, B: True})
    link.answers[B] = [FakeReply()]
    router.holding = HoldingQueue(timeout_s=30, tick_s=0.01)
    router.book.report(B, NodeLoad.of({KEY: ModelLoad(True, 1, 1, 1)}, num_parallel=1), router.clock())
    gate, ran = asyncio.Event(), []
    handler = spec(gated(gate, ran))
    first = asyncio.create_task(router.serve(handler, body(), call(router)))
    await asyncio.sleep(0.02)
    second = asyncio.create_task(router.serve(handler, body(), call(router)))
    await asyncio.sleep(0.05)
    assert not second.done() and not link.sent
    router.book.report(B, NodeLoad.of({KEY: ModelLoad(True, 0, 0, 1)}, num_parallel=1), router.clock())
    router.holding.changed()
    assert (await second).body == b'{"ok": true}'
    assert [s[0] for s in link.sent] == [B]
    gate.set()
    await first


async def test_a_lone_node_queues_on_itself_and_a_full_cluster_answers_503_with_retry_after() -> None:
    router, _, _, _ = make({A: True})
    router.holding = HoldingQueue(timeout_s=0.05, tick_s=0.01)
    gate, ran = asyncio.Event(), []
    handler = spec(gated(gate, ran))
    both = [asyncio.create_task(router.serve(handler, body(), call(router))) for _ in range(2)]
    await asyncio.sleep(0.02)
    assert ran == ["start", "start"] and router.holding.held == 0  # no peer: its scheduler queues it
    gate.set()
    await asyncio.gather(*both)
    busy, _, _, _ = make({A: True, B: True})
    busy.holding = HoldingQueue(timeout_s=0.05, tick_s=0.01)
    busy.book.report(B, NodeLoad.of({KEY: ModelLoad(True, 1, 3, 1)}, num_parallel=1), busy.clock())
    gate2, ran2 = asyncio.Event(), []
    first = asyncio.create_task(busy.serve(spec(gated(gate2, ran2)), body(), call(busy)))
    await asyncio.sleep(0.02)
    with pytest.raises(ServiceBusy) as info:
        await busy.serve(spec(gated(gate2, ran2)), body(), call(busy))
    assert info.value.retry_after >= 1 and "routing.queue_timeout" in info.value.message
    gate2.set()
    await first
    assert NodeId(B) not in busy.busy_models()


# ------------------------------------------------------------------ the demand shell


class FakeReplicator:
    """What :class:`DemandReplicas` uses of the replicator: the snapshot, peer commands, local fetches."""

    def __init__(self, node_id: str, snap: Any, *, fail: bool = False) -> None:
        self.node_id = NodeId(node_id)
        self.asked: list[tuple[str, str, dict[str, Any]]] = []
        self.refreshed: list[str] = []
        self.fail = fail
        self.release = asyncio.Event()
        outer = self

        class Link:
            def cluster_snapshot(self) -> Any:
                return snap

            async def refresh_peer(self, node: str) -> None:
                outer.refreshed.append(node)

        class Commands:
            async def stream(self, node: str, path: str, doc: dict[str, Any]) -> Any:
                outer.asked.append((node, path, doc))
                await outer.release.wait()
                if outer.fail:
                    raise PeerError(f"{node}: no room")
                yield {"status": "success"}

        self.link, self.commands = Link(), Commands()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return asyncio.create_task(coro, name=name)


async def test_overflow_asks_one_idle_node_once_and_waits_after_a_failure() -> None:
    m = model("m")
    snap = cluster({"a": holdings(m), "b": holdings(), "c": holdings()})
    r = FakeReplicator("a", snap, fail=True)
    clock = [1000.0]
    loads = {NodeId("b"): NodeLoad(), NodeId("c"): NodeLoad.of({"x": ModelLoad(True, 1, 0, 1)})}
    demand = DemandReplicas(cast(Any, r), loads.get, max_factor=3, retry_s=30, clock=lambda: clock[0])
    held = Holders("m:latest", (NodeId("a"),), (), m.size, m.name)
    demand.overflow(held)
    demand.overflow(held)  # one copy of a model at a time
    await asyncio.sleep(0)
    assert [(n, d["origin"], d["digest"]) for n, _, d in r.asked] == [("b", "demand", m.digest)]  # c is busy
    r.release.set()
    await asyncio.sleep(0.01)
    assert demand.stats.failed == 1 and not r.refreshed
    demand.overflow(held)
    assert len(r.asked) == 1  # within retry_s of the failure
    clock[0] += 31
    r.fail = False
    demand.overflow(held)
    await asyncio.sleep(0.01)
    assert len(r.asked) == 2 and r.refreshed == ["b"] and demand.stats.completed == 1
    DemandReplicas(cast(Any, r), loads.get, max_factor=1).overflow(held)  # max_factor 1: never
    await asyncio.sleep(0.01)
    assert len(r.asked) == 2
