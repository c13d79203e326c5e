"""What an idle node does in the background: resources sampled when read, peer inventories re-read sparingly."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from omx.mesh import MemberState
from omx.runtime.cluster.inventory import PEER_MAX_AGE_S, PEER_REFRESH_S, PeerInventories, PeerInventory
from omx.runtime.cluster.resources import ResourceSampler


def test_resources_and_connections_are_sampled_when_read(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.create_server(("127.0.0.1", 0)))

        def connect() -> None:
            stack.enter_context(socket.create_connection(server.getsockname()))
            stack.enter_context(server.accept()[0])

        sampler = ResourceSampler(tmp_path, period_s=3600.0)
        sampler.api_port = server.getsockname()[1]
        assert sampler.latest.memory_total > 0 and 0.0 <= sampler.latest.cpu <= 1.0
        connect()
        assert sampler.current_connections() == 1  # counted on the first ask
        connect()
        assert sampler.current_connections() == 1  # then kept for period_s
        sampler.period_s = 0.0
        assert sampler.current_connections() == 2


def member(name: str) -> MemberState:
    return MemberState(name, "127.0.0.1", 4001, "alive", {"api": "127.0.0.1:8080", "inv": "1"}, 0.0)


def inventory(fetched_at: float, error: str | None = None) -> PeerInventory:
    return PeerInventory(version="1", models=(), resources=None, fetched_at=fetched_at, error=error)


async def test_peer_inventories_are_re_read_when_failed_unknown_or_old() -> None:
    peers = PeerInventories("me", key=lambda: b"k" * 32)
    now = 10_000.0
    peers.cache.update({"fresh": inventory(now - 5), "failed": inventory(now - 5, error="refused"),
                        "old": inventory(now - PEER_MAX_AGE_S - 1)})
    names = ["fresh", "failed", "old", "unknown"]
    assert peers.due([member(n) for n in names], now) == {"failed", "old", "unknown"}
    # A big cluster stretches the age so that each node re-reads about one peer per round.
    crowd = [member(f"n{i}") for i in range(100)]
    peers.cache = {m.name: inventory(now - PEER_MAX_AGE_S - 1) for m in crowd}
    assert peers.due(crowd, now) == set()
    assert len(peers.due(crowd, now + PEER_REFRESH_S * len(crowd))) == len(crowd)
    await peers.aclose()
