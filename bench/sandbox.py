"""Sandbox benchmark: what a custom function costs through :class:`FunctionPool`, against a plain call.

In one run, for a no-op function:

* deploy-time inspection (``inspect_source``: a throw-away sandboxed import);
* cold start: the first call on a new pool (bubblewrap, Python, the import, the call), p50 over fresh pools;
* warm calls, one at a time: p50/p99 through the pool (pipe out, worker, pipe back) vs the same
  coroutine awaited in-process, and their ratio;
* throughput: calls/s with 1 and with ``concurrency`` workers busy at once.

``--profile`` prints the node side's cProfile of the warm calls. Figures are printed, never asserted.
Run: ``.venv/bin/python bench/sandbox.py [--calls 3000] [--cold 10] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from typing import Any

from omx.functions import Context, FunctionSpec, function
from omx.runtime.sandbox import FunctionPool, inspect_source, sandbox_problem

SOURCE = '''
from omx.functions import Context, function

@function(concurrency=4)
async def noop(body: dict, ctx: Context) -> dict:
    return body
'''


class Host:
    node_id = "bench"

    async def model_call(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    def log(self, function: str, line: str) -> None:
        pass


class _Channel:
    async def request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    def log(self, line: str) -> None:
        pass


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _inprocess(calls: int) -> list[float]:
    @function
    async def noop(body: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return body

    samples = []
    for i in range(calls):
        t0 = time.perf_counter()
        await noop({"i": i}, Context(node="bench", headers={}, channel=_Channel()))
        samples.append(time.perf_counter() - t0)
    return samples


async def _warm(pool: FunctionPool, calls: int) -> list[float]:
    samples = []
    for i in range(calls):
        t0 = time.perf_counter()
        await pool.call({"i": i}, {"content-type": "application/json"})
        samples.append(time.perf_counter() - t0)
    return samples


async def _throughput(spec: FunctionSpec, parallel: int, seconds: float) -> float:
    pool = FunctionPool(filename="noop.py", source=SOURCE, spec=spec, host=Host())
    try:
        await asyncio.gather(*(pool.call({}, {}) for _ in range(parallel)))  # every worker started
        done = 0
        stop = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await pool.call({}, {})
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(parallel)))
        return done / (time.perf_counter() - t0)
    finally:
        await pool.aclose()


async def main(args: argparse.Namespace) -> None:
    problem = sandbox_problem()
    if problem:
        raise SystemExit(problem)
    t0 = time.perf_counter()
    spec = (await inspect_source("noop.py", SOURCE))[0]
    inspect_ms = (time.perf_counter() - t0) * 1000

    cold = []
    for _ in range(args.cold):
        pool = FunctionPool(filename="noop.py", source=SOURCE, spec=spec, host=Host(), prewarm=False)
        t0 = time.perf_counter()
        await pool.call({}, {})
        cold.append(time.perf_counter() - t0)
        await pool.aclose()

    pool = FunctionPool(filename="noop.py", source=SOURCE, spec=spec, host=Host())
    await _warm(pool, 200)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    warm = await _warm(pool, args.calls)
    if profiler:
        profiler.disable()
    await pool.aclose()
    local = await _inprocess(args.calls)
    one = await _throughput(spec, 1, args.seconds)
    many = await _throughput(spec, spec.concurrency, args.seconds)

    print(f"inspect_source (sandboxed import)     {inspect_ms:8.1f} ms")
    print(f"cold start, first call on a new pool  {statistics.median(cold) * 1000:8.1f} ms p50 "
          f"({min(cold) * 1000:.1f}..{max(cold) * 1000:.1f}, n={len(cold)})")
    print(f"warm call through the pool            {_pct(warm, .5):8.3f} ms p50 {_pct(warm, .99):8.3f} ms p99")
    print(f"in-process await of the same function {_pct(local, .5):8.3f} ms p50 {_pct(local, .99):8.3f} ms p99")
    print(f"warm overhead                         {_pct(warm, .5) - _pct(local, .5):8.3f} ms p50; "
          f"ratio pool/in-process {_pct(warm, .5) / _pct(local, .5):.0f}x p50, "
          f"{_pct(warm, .99) / _pct(local, .99):.0f}x p99; "
          f"cold/warm {statistics.median(cold) / statistics.median(warm):.0f}x")
    print(f"throughput                            {one:8.0f} calls/s with 1 worker, "
          f"{many:.0f} calls/s with {spec.concurrency} ({many / one:.2f}x)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--cold", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--profile", action="store_true")
    asyncio.run(main(parser.parse_args()))
