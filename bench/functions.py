"""Custom functions: cold start, warm-call latency and throughput against the built-in ``/api/version``.

One real node (``omx start``, bubblewrap sandboxes). A no-op function
(``GET``/``POST /fn/noop``, returns ``{}``) is deployed and measured against the
built-in ``GET /api/version`` over HTTP/1.1 keep-alive on loopback:

* **cold start**: ``--cold`` times, a new version of the function is deployed
  (a different comment, so a different BLAKE3 version and a fresh pool) and
  called at once: the deploy request (validation in a sandboxed worker), and
  the time from its answer to the first answered call (the new pool's first
  worker starting up); median and max;
* **warm calls**: ``--requests`` sequential calls of each endpoint, alternating;
  p50 and p99 of each and of the overhead (function minus built-in);
* **throughput**: calls/s for ``--seconds`` with 1 client, then with
  ``--concurrency`` clients (the function's ``concurrency``, so as many warm
  workers), for both endpoints; and the ratios function/built-in.

Run: ``python bench/functions.py [--requests 2000] [--cold 5] [--seconds 5] [--concurrency 4]``.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._node import start_node  # noqa: E402

NOOP = '''
from omx.functions import function

# variant {variant}
@function(methods=("GET", "POST"), concurrency={concurrency})
def noop(body: dict) -> dict:
    return {{}}
'''


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def deploy(client: httpx.Client, variant: int, concurrency: int) -> float:
    started = time.perf_counter()
    r = client.post("/api/functions", json={"filename": "noop.py",
                                            "source": NOOP.format(variant=variant, concurrency=concurrency)})
    if r.status_code != 201:
        raise SystemExit(f"deploy failed: {r.status_code} {r.text}")
    return time.perf_counter() - started


def cold_starts(client: httpx.Client, count: int, concurrency: int) -> None:
    deploys, firsts = [], []
    for variant in range(1, count + 1):
        deploys.append(deploy(client, variant, concurrency))
        started = time.perf_counter()
        r = client.get("/fn/noop")
        if r.status_code != 200:
            raise SystemExit(f"first call failed: {r.status_code} {r.text}")
        firsts.append(time.perf_counter() - started)
    print(f"cold start ({count} fresh versions):")
    print(f"  deploy (sandboxed inspection)   median {ms(statistics.median(deploys))}  max {ms(max(deploys))}")
    print(f"  first call after the deploy     median {ms(statistics.median(firsts))}  max {ms(max(firsts))}")


def warm(client: httpx.Client, requests: int) -> None:
    for _ in range(50):
        client.get("/fn/noop")
        client.get("/api/version")
    fn, builtin = [], []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.get("/fn/noop")
        t1 = time.perf_counter()
        client.get("/api/version")
        t2 = time.perf_counter()
        fn.append(t1 - t0)
        builtin.append(t2 - t1)
    over = [a - b for a, b in zip(fn, builtin, strict=True)]
    print(f"warm calls ({requests} each, sequential, keep-alive):")
    print(f"  GET /fn/noop        p50 {ms(pct(fn, 0.5))}  p99 {ms(pct(fn, 0.99))}")
    print(f"  GET /api/version    p50 {ms(pct(builtin, 0.5))}  p99 {ms(pct(builtin, 0.99))}")
    print(f"  overhead            p50 {ms(pct(over, 0.5))}  p99 {ms(pct(over, 0.99))}  "
          f"(ratio of p50s {pct(fn, 0.5) / pct(builtin, 0.5):.2f}x)")


async def rate(url: str, path: str, clients: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while time.perf_counter() < stop:
                r = await client.get(path)
                if r.status_code != 200:
                    raise SystemExit(f"{path}: {r.status_code} {r.text}")
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - started)


def throughput(url: str, concurrency: int, seconds: float) -> None:
    print(f"throughput ({seconds:g} s each):")
    for clients in (1, concurrency):
        fn = asyncio.run(rate(url, "/fn/noop", clients, seconds))
        builtin = asyncio.run(rate(url, "/api/version", clients, seconds))
        print(f"  {clients} client(s): /fn/noop {fn:8.0f} calls/s   /api/version {builtin:8.0f} calls/s   "
              f"ratio {fn / builtin:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omx-bench-fn-") as tmp:
        proc, info = start_node(Path(tmp) / "home", {"OMX_WEB__ENABLED": "false"})
        try:
            url = info["url"]
            with httpx.Client(base_url=url, timeout=60) as client:
                deadline = time.monotonic() + 30
                while client.get("/api/functions").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.1)
                cold_starts(client, args.cold, args.concurrency)
                warm(client, args.requests)
            throughput(url, args.concurrency, args.seconds)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except Exception:  # noqa: BLE001 - a stuck node is killed
                proc.kill()


if __name__ == "__main__":
    main()
