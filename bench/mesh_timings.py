"""Measure Serf membership timings on loopback: join, graceful leave, failure detection.

Usage: python bench/mesh_timings.py [--profile local|lan] [--nodes 3] [--rounds 3]

Each round starts fresh agents on 127.78.0.N:4001 (encrypted gossip), then
prints: time from the join RPC until every node sees all alive; from an RPC
leave until the others see ``left``; from ``kill -9`` until the others see
``failed``. Figures only, nothing asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from omx.mesh import AgentConfig, ClusterSecret, Membership, SerfAgent


async def until(check, deadline_s: float = 120.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > deadline_s:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def status(m: Membership, name: str) -> str | None:
    state = m.view.get(name)
    return state.status if state else None


async def one_round(root: Path, profile: str, n: int) -> tuple[float, float, float]:
    key = ClusterSecret.generate().gossip_key()
    nodes = [
        Membership(SerfAgent(AgentConfig(node_name=f"omx-bench{i:03d}", bind=f"127.78.0.{i}", profile=profile,  # type: ignore[arg-type]
                                         encrypt_key=key), root / str(i), restart=False))
        for i in range(1, n + 1)
    ]
    await asyncio.gather(*(m.start() for m in nodes))
    try:
        names = [m.agent.config.node_name for m in nodes]
        t0 = time.monotonic()
        await asyncio.gather(*(m.join(["127.78.0.1:4001"]) for m in nodes[1:]))
        await until(lambda: all(len(m.view.alive()) == n for m in nodes))
        join = time.monotonic() - t0

        victim, leaver, observer = nodes[-1], nodes[-2], nodes[0]
        t0 = time.monotonic()
        os.kill(victim.agent.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await until(lambda: status(observer, names[-1]) == "failed")
        failed = time.monotonic() - t0

        t0 = time.monotonic()
        await leaver.leave()
        await until(lambda: status(observer, names[-2]) == "left")
        leave = time.monotonic() - t0
        return join, leave, failed
    finally:
        await asyncio.gather(*(m.stop(leave=False) for m in nodes), return_exceptions=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="local", choices=["local", "lan"])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="omx-mesh-bench-") as tmp:
        for r in range(args.rounds):
            results.append(await one_round(Path(tmp) / str(r), args.profile, args.nodes))
    print(f"serf profile={args.profile} nodes={args.nodes} rounds={args.rounds}")
    for label, values in zip(("join (all see alive)", "graceful leave seen", "kill -9 seen failed"),
                             zip(*results, strict=True), strict=True):
        print(f"  {label:<22} median {statistics.median(values):6.2f}s  "
              f"min {min(values):6.2f}s  max {max(values):6.2f}s")


if __name__ == "__main__":
    asyncio.run(main())
