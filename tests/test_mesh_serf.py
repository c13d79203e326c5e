"""Three real Serf agents on loopback: join, tags, events, queries, failure, leave, wrong keys."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from omx.mesh import (
    AgentConfig,
    ClusterSecret,
    MemberChanged,
    Membership,
    NodeTags,
    SerfAgent,
    SerfRPCError,
    UserEvent,
)
from tests.support.serf import eventually, require_serf, serf_pids

pytestmark = [pytest.mark.serf, pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SUBNET = "127.77.0."  # all of 127/8 is loopback on Linux; one address per node
DEADLINE_S = 30.0



@dataclass
class Cluster:
    nodes: dict[str, Membership]
    secret: ClusterSecret
    root: Path


def make_agent(root: Path, name: str, host: str, encrypt_key: str | None, *, restart: bool = True,
               join: tuple[str, ...] = ()) -> SerfAgent:
    tags = NodeTags(api=f"{host}:8080", h3_port=8080, inventory="1").to_tags()
    config = AgentConfig(node_name=name, bind=host, port=4001, profile="local", tags=tags,
                         encrypt_key=encrypt_key, join=join, join_retry_s=0.5)
    return SerfAgent(config, root / name, restart=restart)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    require_serf()
    root = tmp_path_factory.mktemp("mesh-cluster")
    secret = ClusterSecret.generate()
    key = secret.gossip_key()
    nodes = {
        name: Membership(make_agent(root, name, f"{SUBNET}{i}", key, restart=False))
        for i, name in enumerate(("omx-a0000001", "omx-b0000002", "omx-c0000003"), start=1)
    }
    try:
        await asyncio.gather(*(m.start() for m in nodes.values()))
        yield Cluster(nodes, secret, root)
    finally:
        await asyncio.gather(*(m.stop(leave=False) for m in nodes.values()), return_exceptions=True)
        await eventually(lambda: not serf_pids(str(root)), "no serf agent left running")


def alive_names(m: Membership) -> set[str]:
    return {s.name for s in m.view.alive()}


async def test_join_by_address_all_see_three_alive(cluster: Cluster) -> None:
    a, b, c = cluster.nodes.values()
    assert await a.join([f"{SUBNET}2:4001"]) == 1
    assert await c.join([f"{SUBNET}1:4001"]) == 1
    names = set(cluster.nodes)
    for m in (a, b, c):
        await eventually(lambda m=m: alive_names(m) == names, f"{m.agent.config.node_name} sees 3 alive")
    member = a.view.get("omx-b0000002")
    assert (member.addr, member.port) == (f"{SUBNET}2", 4001)
    assert NodeTags.from_tags(member.tags) == NodeTags(api=f"{SUBNET}2:8080", h3_port=8080, inventory="1")
    raw = await a.agent.rpc.members_filtered(tags={"api": f"{SUBNET}3:.*"}, status="alive")
    assert [r.name for r in raw] == ["omx-c0000003"]


async def test_tag_update_propagates(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes.values()
    sub = b.subscribe()
    await a.update_tags({"inv": "7"})
    await eventually(lambda: b.view.get("omx-a0000001").tags.get("inv") == "7", "b sees a's new inventory")
    seen: list[MemberChanged] = []
    while not any(c.name == "omx-a0000001" and c.kind == "updated" for c in seen):
        event = await sub.next(DEADLINE_S)
        if isinstance(event, MemberChanged):
            seen.append(event)
    sub.close()
    assert a.agent.tags["inv"] == "7"


async def test_user_events_reach_other_nodes(cluster: Cluster) -> None:
    a, _, c = cluster.nodes.values()
    sub = c.subscribe()
    await a.user_event("omx-inventory", b"\x00\x01payload", coalesce=False)
    end = time.monotonic() + DEADLINE_S
    while True:
        event = await sub.next(max(0.1, end - time.monotonic()))
        if isinstance(event, UserEvent) and event.name == "omx-inventory":
            break
    sub.close()
    assert event.payload == b"\x00\x01payload" and not event.coalesce


async def test_query_is_answered_by_a_peer(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes.values()
    queries = await b.agent.rpc.stream("query")

    async def answer() -> None:
        async for q in queries:
            if q.name == "omx-ping":
                await b.agent.rpc.respond(q.id, b"pong:" + q.payload)
                return

    responder = asyncio.create_task(answer())
    try:
        responses = await a.agent.rpc.query("omx-ping", b"1", filter_nodes=["omx-b0000002"], timeout_s=1)
    finally:
        await asyncio.wait_for(responder, DEADLINE_S)
        await queries.aclose()
    assert [(r.node, r.payload) for r in responses] == [("omx-b0000002", b"pong:1")]
    stats = await a.agent.rpc.stats()
    assert stats["agent"]["name"] == "omx-a0000001"


async def test_wrong_key_or_no_key_cannot_join(cluster: Cluster) -> None:
    a = cluster.nodes["omx-a0000001"]
    for i, key in ((4, ClusterSecret.generate().gossip_key()), (5, None)):
        intruder = make_agent(cluster.root, f"omx-x000000{i}", f"{SUBNET}{i}", key, restart=False)
        await intruder.start()
        try:
            try:
                joined = await intruder.join([f"{SUBNET}1:4001"])
            except SerfRPCError:
                joined = 0
            assert joined == 0
            names = {m.name for m in await a.agent.rpc.members()}
            assert f"omx-x000000{i}" not in names
            assert len(await intruder.rpc.members()) == 1
        finally:
            await intruder.stop(graceful=False)


async def test_kill_9_is_seen_as_failed(cluster: Cluster) -> None:
    a, b, c = cluster.nodes.values()
    pid = c.agent.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for m in (a, b):
        await eventually(lambda m=m: getattr(m.view.get("omx-c0000003"), "status", None) == "failed",
                         "c seen failed")
    await eventually(lambda: c.agent.state == "failed", "c's supervisor records the crash")
    assert c.agent.pid is None  # restart=False: nothing came back


async def test_graceful_leave_is_seen_as_left(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes.values()
    sub = a.subscribe()
    await b.leave()
    await eventually(lambda: getattr(a.view.get("omx-b0000002"), "status", None) == "left", "b seen left")
    while True:
        event = await sub.next(DEADLINE_S)
        if isinstance(event, MemberChanged) and event.name == "omx-b0000002" and event.after is not None \
                and event.after.status == "left":
            break
    sub.close()
    assert b.agent.pid is None and b.agent.state == "left"
