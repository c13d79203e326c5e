"""What a node keeps about its custom functions' calls: log lines, counts, latencies, Prometheus series.

Log lines live in one bounded ring per function (the oldest go first), each
numbered by a per-node sequence so a follower asks for "lines after N".
Latencies are the last :data:`LATENCY_SAMPLES` call durations per function,
which is what p50/p99 are computed from, here and (merged) cluster-wide.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from omx.functions.custom_view import LogLine

__all__ = ["LATENCY_SAMPLES", "LOG_LINES", "FunctionFigures", "FunctionLogs", "FunctionMetrics"]

LOG_LINES = 1000
"""Lines kept per function on each node."""
LATENCY_SAMPLES = 512
MAX_LINE = 4096
"""Characters kept of one logged line."""
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class FunctionLogs:
    """Per-function rings of :class:`LogLine`; :meth:`wait` wakes followers when a line arrives."""

    def __init__(self, node_id: str, *, per_function: int = LOG_LINES) -> None:
        self.node_id = node_id
        self._rings: dict[str, deque[LogLine]] = {}
        self._per_function = per_function
        self._seq = 0
        self._event = asyncio.Event()

    def add(self, function: str, version: str, line: str) -> None:
        self._seq += 1
        ring = self._rings.setdefault(function, deque(maxlen=self._per_function))
        ring.append(LogLine(time.time(), self.node_id, version, line[:MAX_LINE], self._seq))
        event, self._event = self._event, asyncio.Event()
        event.set()

    def after(self, function: str, seq: int) -> list[LogLine]:
        """Lines of ``function`` numbered above ``seq``, oldest first."""
        return [line for line in self._rings.get(function, ()) if line.seq > seq]

    def forget(self, function: str) -> None:
        self._rings.pop(function, None)

    async def wait(self, seconds: float) -> None:
        """Until the next line of any function, or ``seconds``."""
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass


@dataclass
class FunctionFigures:
    """Calls, errors and the latest latencies (seconds) of one function on this node."""

    calls: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def to_json(self) -> dict[str, object]:
        return {"calls": self.calls, "errors": self.errors, "latencies": [round(s, 6) for s in self.latencies]}


class FunctionMetrics:
    """Figures per function, and the ``omx_function_*`` series in the node's Prometheus registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.figures: dict[str, FunctionFigures] = {}
        self._calls = Counter("omx_function_calls", "Custom function calls, by function and status",
                              ("function", "status"), registry=registry)
        self._duration = Histogram("omx_function_call_duration_seconds",
                                   "Custom function call time (to the last streamed item), by function",
                                   ("function",), buckets=_BUCKETS, registry=registry)
        self._deploys = Counter("omx_function_changes", "Function table changes applied on this node, by kind",
                                ("kind",), registry=registry)

    def call_done(self, function: str, status: int, seconds: float) -> None:
        figures = self.figures.setdefault(function, FunctionFigures())
        figures.calls += 1
        if status >= 400:
            figures.errors += 1
        figures.latencies.append(seconds)
        self._calls.labels(function, str(status)).inc()
        self._duration.labels(function).observe(seconds)

    def changed(self, kind: str) -> None:
        """A function was started (``serve``) or stopped (``retire``) on this node."""
        self._deploys.labels(kind).inc()

    def forget(self, function: str) -> None:
        self.figures.pop(function, None)
