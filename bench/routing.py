"""Routing: cluster throughput through one entry node, and what a forwarded request adds.

Three real nodes (``omx start`` each, real Serf, 127.0.0.N) run an engine double
whose runners produce a token every ``--token-ms`` (asyncio sleeps: the figures
measure routing, not the CPU; :mod:`tests.support.timed_engine` swaps it in for
llama.cpp). Models (the generated tiny GGUF, so the
store and handlers do their real work):

* ``n1`` on A; ``n2`` on A and B; ``n3`` on A, B and C;
* ``solo-a`` on A only, ``solo-b`` on B only.

**Throughput**: for N = 1, 2, 3, ``--clients`` closed-loop clients per holder send
non-streamed ``/api/generate`` requests for ``nN`` (``--tokens`` tokens each) to
A for ``--seconds``; printed: requests/s, the ratio to N x the one-node figure
(target >= 0.9·N), and which node served how many (``X-Omx-Node``).

**Added latency**: ``--requests`` sequential one-token requests to A for
``solo-a`` (served by A) and ``solo-b`` (forwarded to B), alternating; printed:
p50 and p99 of each and of the difference (target p50 <= 2 ms on loopback).

Run: ``python bench/routing.py [--token-ms 10] [--tokens 16] [--parallel 4] [--clients 2] [--seconds 10]
[--requests 400]``. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Cluster, ClusterNode, start_cluster  # noqa: E402
from tests.support.node import create_model, wait_until  # noqa: E402
from tests.support.timed_engine import timed_engine_env  # noqa: E402
from tests.support.tiny_gguf import write_tiny_llama  # noqa: E402

TEMPLATE = "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:"



def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


async def throughput(entry: ClusterNode, model: str, clients: int, tokens: int,
                     seconds: float) -> tuple[float, Counter[str]]:
    """Completed requests per second over ``seconds`` with ``clients`` closed-loop clients, and who served them."""
    served: Counter[str] = Counter()
    done = 0
    body = {"model": model, "prompt": "the cat", "stream": False, "options": {"num_predict": tokens}}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=entry.url, timeout=120, limits=limits) as client:
        for _ in range(2):  # warm: models loaded everywhere, connections open
            await asyncio.gather(*(client.post("/api/generate", json=body) for _ in range(clients)))
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                r = await client.post("/api/generate", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{model}: {r.status_code} {r.text}")
                if time.perf_counter() <= stop_at:
                    done += 1
                    served[r.headers.get("x-omx-node", "?")] += 1

        await asyncio.gather(*(loop() for _ in range(clients)))
    return done / (min(time.perf_counter(), stop_at) - started), served


def added_latency(entry: ClusterNode, requests: int) -> dict[str, list[float]]:
    """Sequential one-token requests for a local and a forwarded model, alternating; seconds each."""
    times: dict[str, list[float]] = {"solo-a": [], "solo-b": []}
    with httpx.Client(base_url=entry.url, timeout=30) as client:
        for model in times:
            for _ in range(20):
                client.post("/api/generate", json={"model": model, "prompt": "x", "stream": False,
                                                   "options": {"num_predict": 1}})
        for _ in range(requests):
            for model, samples in times.items():
                t0 = time.perf_counter()
                r = client.post("/api/generate", json={"model": model, "prompt": "x", "stream": False,
                                                       "options": {"num_predict": 1}})
                samples.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    return times


def setup(root: Path, token_s: float, parallel: int) -> Cluster:
    env = {**timed_engine_env(root / "site", token_s), "OMX_ENGINE__NUM_PARALLEL": str(parallel),
           "OMX_ENGINE__MAX_LOADED_MODELS": "8", "OMX_MODELS__REGISTRY": "127.0.0.1:9"}
    cluster = start_cluster(root / "nodes", 3, env=env)
    gguf = write_tiny_llama(root / "tiny.gguf", seed=7)
    a, b, c = cluster.nodes
    placement = {"n1": (a,), "n2": (a, b), "n3": (a, b, c), "solo-a": (a,), "solo-b": (b,)}
    for model, nodes in placement.items():
        for node in nodes:
            with node.client() as client:
                create_model(client, model, gguf, template=TEMPLATE)
    for node in cluster.nodes:
        wait_until(lambda n=node: {m["name"]: len(m["held_by"]) for m in n.get("/api/tags")["models"]}
                   == {"n1:latest": 1, "n2:latest": 2, "n3:latest": 3, "solo-a:latest": 1, "solo-b:latest": 1},
                   timeout=60, what=f"{node.label} to see every model's holders")
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="engine.num_parallel of every node")
    parser.add_argument("--clients", type=int, default=2, help="closed-loop clients per holder and slot")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omx-bench-routing-") as tmp:
        cluster = setup(Path(tmp), args.token_ms / 1000, args.parallel)
        try:
            names = {n.node_id: n.label for n in cluster.nodes}
            entry = cluster.nodes[0]
            per_request = args.tokens * args.token_ms / 1000
            print(f"engine double: {args.tokens} tokens x {args.token_ms:g} ms = {per_request * 1000:.0f} ms a "
                  f"request, num_parallel {args.parallel}: at most {args.parallel / per_request:.1f} req/s a node")
            one = 0.0
            for n in (1, 2, 3):
                clients = args.clients * args.parallel * n
                rate, served = asyncio.run(throughput(entry, f"n{n}", clients, args.tokens, args.seconds))
                one = one or rate
                order = sorted(served, key=lambda k: names.get(k, k))
                spread = ", ".join(f"{names.get(k, k)} {served[k]}" for k in order)
                print(f"N={n}: {rate:7.1f} req/s through A ({clients} clients), {rate / (n * one):.2f} x N x one node"
                      f"  [served: {spread}]")
            times = added_latency(entry, args.requests)
            local, remote = times["solo-a"], times["solo-b"]
            diff = [r - loc for r, loc in zip(remote, local, strict=True)]
            for label, samples in (("local (solo-a on A)", local), ("forwarded (solo-b on B)", remote)):
                print(f"{label:26s} p50 {1000 * statistics.median(samples):6.2f} ms  "
                      f"p99 {1000 * percentile(samples, 0.99):6.2f} ms")
            p50 = statistics.median(remote) - statistics.median(local)
            print(f"{'added by forwarding':26s} p50 {1000 * p50:6.2f} ms  "
                  f"p99 {1000 * (percentile(remote, 0.99) - percentile(local, 0.99)):6.2f} ms  "
                  f"(pairwise median {1000 * statistics.median(diff):.2f} ms)")
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
