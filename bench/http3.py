"""HTTP/1.1 vs HTTP/3 against one node, in one run, printed as ratios.

One ``omx start`` node (standalone, its own home, the generated tiny llama model)
serves both: HTTP/1.1 on its TCP port and HTTP/3 (Hypercorn's HTTP layer on qh3's QUIC) on its UDP
port. The clients are httpx (HTTP/1.1, keep-alive) and httpx over omx's
:class:`~omx.runtime.http3.AsyncHttp3Transport` (qh3, verified against the
node's cluster CA), one connection each, on one event loop:

* ``/api/version``: requests per second and p50/p99 latency, sequential;
* a streamed ``/api/generate`` (``num_predict`` tokens, greedy): time to first
  token and NDJSON lines per second;
* an upload to ``/api/blobs/:digest`` (``--upload-mib``): MB/s;
* a chunk transfer on the peer path (``--chunk-mib``, the node's ``models.chunk_size``): one signed
  ``GET /api/peer/blobs/:digest/chunks`` through :class:`~omx.runtime.peer.HttpPeerTransport`, over
  HTTP/1.1 from the transfer listener (``sendfile``, :class:`~omx.runtime.peer.wire.WireClient`) and
  over HTTP/3 from the QUIC listener (:class:`~omx.runtime.peer.h3.H3PeerClient`), as
  ``peer.transport: http1`` and ``http3`` do: MB/s, and the CPU time the serving node and the client
  spent per MiB (from ``/proc``; the client's includes this process's other threads).

Contenders alternate in ``--repeat`` rounds and the best round of each counts
(the machine may be shared). Before the rounds each peer transport moves ``--warmup`` untimed chunks
(default 1), as a node replicating a model opens its connection to a peer once and keeps it: the first
transfer on a new connection also pays its handshake (TCP, or QUIC with a Retry and the certificate check)
and, over QUIC, slow start from a two-datagram congestion window, and the serving node's first transfers
grow its heap (``--warmup 0`` measures that cold start too). Figures are printed, never asserted.

Run: ``python bench/http3.py [--requests 400] [--tokens 128] [--upload-mib 64] [--chunk-mib 64] [--repeat 3]
[--warmup 1] [--only chunk upload]``.
``--profile DIR`` also writes a cProfile of this process's HTTP/3 chunk transfers and uploads there.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omx.mesh import ClusterSecret  # noqa: E402
from omx.runtime.http3 import AsyncHttp3Transport  # noqa: E402
from omx.runtime.peer import HttpPeerTransport  # noqa: E402
from omx.runtime.peer.h3 import H3PeerClient  # noqa: E402
from omx.types import BlobDigest, NodeId  # noqa: E402
from tests.support.node import NodeProcess, create_model, start_node  # noqa: E402
from tests.support.tiny_gguf import write_tiny_llama  # noqa: E402

TEMPLATE = "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:"


async def bench_version(client: httpx.AsyncClient, n: int) -> dict[str, float]:
    await client.get("/api/version")
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.get("/api/version")
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": n / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


async def bench_stream(client: httpx.AsyncClient, tokens: int) -> dict[str, float]:
    body = {"model": "tiny", "prompt": "count with me", "stream": True,
            "options": {"num_predict": tokens, "temperature": 0, "seed": 1}}
    start = time.perf_counter()
    first = None
    lines = 0
    async with client.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            lines += 1
            if first is None:
                first = time.perf_counter() - start
            if json.loads(line).get("done"):
                break
    elapsed = time.perf_counter() - start
    return {"ttft_ms": 1000 * (first or elapsed), "lines_per_s": lines / elapsed}


async def bench_upload(client: httpx.AsyncClient, data: bytes) -> dict[str, float]:
    # A fresh digest each round: the node answers 201 for a blob it already has without reading much.
    payload = os.urandom(16) + data
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    start = time.perf_counter()
    r = await client.post(f"/api/blobs/{digest}", content=payload)
    elapsed = time.perf_counter() - start
    assert r.status_code == 201, r.text
    return {"upload_MBps": len(payload) / elapsed / 1e6}


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_chunk(transport: HttpPeerTransport, digest: str, size: int, buffer: bytearray,
                      server_pid: int) -> dict[str, float]:
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    start = time.perf_counter()
    body = await transport.read_chunks(NodeId("seed"), BlobDigest(digest), 0, 1, size, into=buffer)
    elapsed = time.perf_counter() - start
    assert len(body) == size
    mib = size / (1 << 20)
    return {"chunk_MBps": size / elapsed / 1e6,
            "server_ms_per_MiB": 1000 * (cpu_seconds(server_pid) - server_cpu) / mib,
            "client_ms_per_MiB": 1000 * (time.process_time() - client_cpu) / mib}


class Profiled:
    """Runs the HTTP/3 contenders of the named benches under one cProfile (``--profile``)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.profile = cProfile.Profile()

    async def __call__(self, name: str, label: str, work: Awaitable[dict[str, float]]) -> dict[str, float]:
        if label != "h3" or name not in self.names:
            return await work
        self.profile.enable()
        try:
            return await work
        finally:
            self.profile.disable()


def best(rounds: list[dict[str, float]], key: str, lower: bool = False) -> float:
    """The best round's figure; for CPU time per MiB the mean of all rounds (``/proc`` counts in ticks)."""
    values = [r[key] for r in rounds]
    if key.endswith("_per_MiB"):
        return statistics.mean(values)
    return min(values) if lower else max(values)


async def run(node: NodeProcess, args: argparse.Namespace) -> None:
    ca = node.home / "tls" / "ca.crt"
    h1 = httpx.AsyncClient(base_url=node.url, timeout=120)
    h3 = httpx.AsyncClient(base_url=f"https://127.0.0.1:{node.info['h3_port']}", timeout=120,
                           transport=AsyncHttp3Transport(ca))
    assert (await h3.get("/api/version")).headers["server"] == "hypercorn-h3"
    data = os.urandom(args.upload_mib << 20)
    chunk = os.urandom(args.chunk_mib << 20)
    digest = "sha256:" + hashlib.sha256(chunk).hexdigest()
    assert (await h1.post(f"/api/blobs/{digest}", content=chunk)).status_code == 201
    key = ClusterSecret.from_text((node.home / "cluster" / "secret").read_bytes().hex()).peer_auth_key()
    peers = {
        "h1": HttpPeerTransport("omx-bench", lambda: key, {"seed": f"127.0.0.1:{node.info['transfer_port']}"}.get,
                                timeout=300),
        "h3": HttpPeerTransport("omx-bench", lambda: key, {"seed": f"127.0.0.1:{node.info['h3_port']}"}.get,
                                timeout=300, client=H3PeerClient(ca)),
    }
    buffer = bytearray(len(chunk))
    clients = {"h1": h1, "h3": h3}
    results: dict[str, dict[str, list[dict[str, float]]]] = {"h1": {}, "h3": {}}
    benches: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {
        "version": lambda label: bench_version(clients[label], args.requests),
        "stream": lambda label: bench_stream(clients[label], args.tokens),
        "upload": lambda label: bench_upload(clients[label], data),
        "chunk": lambda label: bench_chunk(peers[label], digest, len(chunk), buffer, node.proc.pid),
    }
    # Only with --profile: cProfile's hooks cost the client about half again its CPU per MiB, and only the
    # HTTP/3 contender ran under them.
    profiled = Profiled({"chunk", "upload"} if args.profile is not None else set())
    await bench_stream(h1, 4)  # load the model once
    if not args.only or "chunk" in args.only:
        for _ in range(args.warmup):
            for label in ("h1", "h3"):
                await benches["chunk"](label)
    for _ in range(args.repeat):
        for name, fn in benches.items():
            if args.only and name not in args.only:
                continue
            for label in ("h1", "h3"):
                results[label].setdefault(name, []).append(await profiled(name, label, fn(label)))
    await h1.aclose()
    await h3.aclose()
    for transport in peers.values():
        await transport.aclose()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        profiled.profile.dump_stats(args.profile / "client-h3.prof")
        print(f"cProfile of the HTTP/3 chunk transfers and uploads (this process): {args.profile / 'client-h3.prof'}")
    rows = [("/api/version requests/s", "version", "rps", False),
            ("/api/version p50 ms", "version", "p50_ms", True),
            ("/api/version p99 ms", "version", "p99_ms", True),
            (f"generate ({args.tokens} tokens) time to first token ms", "stream", "ttft_ms", True),
            ("generate NDJSON lines/s", "stream", "lines_per_s", False),
            (f"upload {args.upload_mib} MiB MB/s", "upload", "upload_MBps", False),
            (f"peer chunk transfer {args.chunk_mib} MiB MB/s", "chunk", "chunk_MBps", False),
            ("  its serving node's CPU ms per MiB", "chunk", "server_ms_per_MiB", True),
            ("  its client's CPU ms per MiB", "chunk", "client_ms_per_MiB", True)]
    print(f"{'measure':<48}{'HTTP/1.1':>12}{'HTTP/3':>12}{'h3/h1':>8}")
    for title, name, key, lower in rows:
        if name not in results["h1"]:
            continue
        a, b = best(results["h1"][name], key, lower), best(results["h3"][name], key, lower)
        ratio = f"{b / a:>8.2f}" if a else f"{'-':>8}"
        print(f"{title:<48}{a:>12.1f}{b:>12.1f}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--upload-mib", type=int, default=64)
    parser.add_argument("--chunk-mib", type=int, default=64, help="the node's models.chunk_size, in MiB")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile output to this folder")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed chunk transfers per peer transport before the rounds (0: measure a cold start)")
    parser.add_argument("--only", nargs="+", choices=["version", "stream", "upload", "chunk"], default=None,
                        help="run only these measures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omx-bench-h3-") as tmp:
        gguf = write_tiny_llama(Path(tmp) / "tiny.gguf", seed=7)
        node = start_node(Path(tmp) / "home", env={"OMX_ENGINE__NUM_CTX": "512", "OMX_WEB__ENABLED": "false",
                                                   "OMX_MODELS__CHUNK_SIZE": f"{args.chunk_mib}MiB"})
        try:
            with node.client() as client:
                create_model(client, "tiny", gguf, template=TEMPLATE)
            asyncio.run(run(node, args))
        finally:
            node.stop()


if __name__ == "__main__":
    main()
