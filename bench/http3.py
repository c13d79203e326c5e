"""HTTP/1.1 vs HTTP/3 against one node, in one run, printed as ratios.

One ``omx start`` node (standalone, its own home, the generated tiny llama model)
serves both: HTTP/1.1 on its TCP port and HTTP/3 (Hypercorn + aioquic) on its UDP
port. The clients are httpx (HTTP/1.1, keep-alive) and httpx over omx's
:class:`~omx.runtime.http3.AsyncHttp3Transport` (aioquic, verified against the
node's cluster CA), one connection each, on one event loop:

* ``/api/version``: requests per second and p50/p99 latency, sequential;
* a streamed ``/api/generate`` (``num_predict`` tokens, greedy): time to first
  token and NDJSON lines per second;
* an upload to ``/api/blobs/:digest`` (``--upload-mib``): MB/s.

Contenders alternate in ``--repeat`` rounds and the best round of each counts
(the machine may be shared). Figures are printed, never asserted.

Run: ``python bench/http3.py [--requests 400] [--tokens 128] [--upload-mib 16] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
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

from omx.runtime.http3 import AsyncHttp3Transport  # noqa: E402
from tests.support.node import create_model, start_node  # noqa: E402
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


def best(rounds: list[dict[str, float]], key: str, lower: bool = False) -> float:
    values = [r[key] for r in rounds]
    return min(values) if lower else max(values)


async def run(url: str, h3_url: str, ca: Path, args: argparse.Namespace) -> None:
    h1 = httpx.AsyncClient(base_url=url, timeout=120)
    h3 = httpx.AsyncClient(base_url=h3_url, timeout=120, transport=AsyncHttp3Transport(ca))
    assert (await h3.get("/api/version")).headers["server"] == "hypercorn-h3"
    data = os.urandom(args.upload_mib << 20)
    results: dict[str, dict[str, list[dict[str, float]]]] = {"h1": {}, "h3": {}}
    benches: dict[str, Callable[[httpx.AsyncClient], Awaitable[dict[str, float]]]] = {
        "version": lambda c: bench_version(c, args.requests),
        "stream": lambda c: bench_stream(c, args.tokens),
        "upload": lambda c: bench_upload(c, data),
    }
    await bench_stream(h1, 4)  # load the model once
    for _ in range(args.repeat):
        for name, fn in benches.items():
            for label, client in (("h1", h1), ("h3", h3)):
                results[label].setdefault(name, []).append(await fn(client))
    await h1.aclose()
    await h3.aclose()
    rows = [("/api/version requests/s", "version", "rps", False),
            ("/api/version p50 ms", "version", "p50_ms", True),
            ("/api/version p99 ms", "version", "p99_ms", True),
            (f"generate ({args.tokens} tokens) time to first token ms", "stream", "ttft_ms", True),
            ("generate NDJSON lines/s", "stream", "lines_per_s", False),
            (f"upload {args.upload_mib} MiB MB/s", "upload", "upload_MBps", False)]
    print(f"{'measure':<48}{'HTTP/1.1':>12}{'HTTP/3':>12}{'h3/h1':>8}")
    for title, name, key, lower in rows:
        a, b = best(results["h1"][name], key, lower), best(results["h3"][name], key, lower)
        print(f"{title:<48}{a:>12.1f}{b:>12.1f}{b / a:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--upload-mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omx-bench-h3-") as tmp:
        gguf = write_tiny_llama(Path(tmp) / "tiny.gguf", seed=7)
        node = start_node(Path(tmp) / "home", env={"OMX_ENGINE__NUM_CTX": "512", "OMX_WEB__ENABLED": "false"})
        try:
            with node.client() as client:
                create_model(client, "tiny", gguf, template=TEMPLATE)
            h3_url = f"https://127.0.0.1:{node.info['h3_port']}"
            asyncio.run(run(node.url, h3_url, node.home / "tls" / "ca.crt", args))
        finally:
            node.stop()


if __name__ == "__main__":
    main()
