"""A timed engine double for real nodes: every token takes a fixed time (an asyncio sleep), no CPU.

Routing figures and demand tests must measure where requests go, not how fast
the CPU decodes. :func:`timed_engine_env` writes a ``sitecustomize`` module into
``site`` and returns the environment that puts it on a node's ``PYTHONPATH``;
in a node started with it, ``make_engine`` returns an engine whose runners
answer ``num_predict`` tokens (16 when unset), one every ``token_s`` seconds.
The store, the handlers, the scheduler and the router do their real work.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

__all__ = ["SITECUSTOMIZE", "timed_engine_env"]

SITECUSTOMIZE = textwrap.dedent('''
    """omx tests and benches: nodes started with OMX_BENCH_TOKEN_S run a timed engine double."""
    import os

    if os.environ.get("OMX_BENCH_TOKEN_S"):
        import asyncio

        import omx.runtime.node as _node
        from omx.protocols import CompletionChunk, CompletionDone
        from omx.runtime.engine._fake import FakeEngine, FakeRunner

        _TOKEN_S = float(os.environ["OMX_BENCH_TOKEN_S"])

        class _TimedRunner(FakeRunner):
            async def complete(self, request):
                limit = request.options.num_predict if request.options.num_predict > 0 else 16
                for _ in range(limit):
                    await asyncio.sleep(_TOKEN_S)
                    yield CompletionChunk("tok ")
                yield CompletionDone("length", 1, 1, limit, int(limit * _TOKEN_S * 1e9))

        class _TimedEngine(FakeEngine):
            name = "bench-timed"

            async def start(self, spec):
                runner = _TimedRunner(spec, self)
                self.runners.append(runner)
                return runner

        _node.make_engine = lambda backend, **kw: _TimedEngine()
''')


def timed_engine_env(site: Path, token_s: float) -> dict[str, str]:
    """Write the ``sitecustomize`` into ``site``; the env vars that make a node run the timed double."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OMX_BENCH_TOKEN_S": str(token_s)}
