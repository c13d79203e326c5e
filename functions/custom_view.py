"""What the custom-function handlers see of the node's function host.

The runtime implements :class:`CustomFunctions` (the function table, the
sandboxed pools, their logs and figures, the cluster distribution) and hands
it to the handlers through ``Services.functions``; the handlers in
:mod:`omx.functions.builtin.custom_functions` only see this protocol and the
frozen facts below. The wire shapes of ``/api/functions`` are built here, so
every node answers with the same ones.

Errors are :class:`~omx.errors.OmxError` subclasses with their HTTP status:
400 for a source that does not import (the message names the line), 404 for
an unknown function, 409 for a name or path owned elsewhere or a rollback
with nothing to roll back to, 413 for a source over the limit, 503 when this
node cannot run sandboxed code (the reason says why).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CustomFunctions",
    "Deployed",
    "FunctionFacts",
    "Invocation",
    "LogLine",
    "deployed_json",
    "function_json",
    "log_json",
    "percentile",
]


@dataclass(frozen=True)
class Deployed:
    """A function as a deploy or rollback left it."""

    name: str
    version: str
    path: str


@dataclass(frozen=True)
class FunctionFacts:
    """One function of the cluster, as ``GET /api/functions`` lists it."""

    name: str
    version: str
    path: str
    methods: tuple[str, ...]
    nodes: tuple[str, ...]
    """The nodes serving this version now."""
    calls: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    deployed_at: float
    versions: tuple[str, ...]
    """Older versions (rollback targets), newest first."""
    file: str = ""


@dataclass(frozen=True)
class LogLine:
    """One line a function logged (``ctx.log``) or the node logged about it."""

    time: float
    node: str
    version: str
    line: str
    seq: int = 0
    """Per-node order (what a follower asks for lines after)."""


@dataclass(frozen=True)
class Invocation:
    """A call's outcome: a JSON-able ``value``, or the items of a generator handler as they come."""

    value: Any = None
    stream: AsyncIterator[Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class CustomFunctions(Protocol):
    """The node's function host as handlers see it."""

    @property
    def node_id(self) -> str:
        ...

    async def deploy(self, filename: str, source: bytes) -> list[Deployed]:
        """Validate ``source`` in a sandbox, store it, serve its functions everywhere."""

    async def listing(self) -> list[FunctionFacts]:
        """Every current function with its serving nodes and cluster-wide figures."""

    async def rollback(self, name: str) -> Deployed:
        """Return ``name`` to its previous version, everywhere."""

    async def remove(self, name: str) -> None:
        """Remove ``name`` from every node."""

    def known(self, name: str) -> bool:
        """True when ``name`` is a current function of the table."""

    def logs(self, name: str, *, follow: bool) -> AsyncIterator[LogLine]:
        """The lines logged by ``name`` on every reachable node; with ``follow``, then new lines as they come."""
        ...

    async def invoke(self, path: str, method: str, body: Any, headers: Mapping[str, str]) -> Invocation:
        """Run the function serving ``method path`` (404: none; 405: not that method)."""

    # ---------------------------------------------------------------- peers

    def peer_table(self) -> dict[str, Any]:
        """This node's table, what it serves and its figures (``GET /api/peer/functions``)."""

    def peer_announce(self, origin: str, doc: Any) -> None:
        """A peer changed its table: merge it (in the background)."""

    async def peer_source(self, version: str) -> bytes:
        """A stored source by version (404 when absent)."""

    def peer_logs(self, name: str, after: int) -> list[LogLine]:
        """This node's lines of ``name`` after sequence number ``after``."""


def percentile(samples: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``samples`` by nearest rank (None when empty)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def deployed_json(d: Deployed) -> dict[str, Any]:
    return {"name": d.name, "version": d.version, "path": d.path}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def function_json(f: FunctionFacts) -> dict[str, Any]:
    return {"name": f.name, "version": f.version, "path": f.path, "methods": list(f.methods),
            "file": f.file, "nodes": list(f.nodes), "calls": f.calls, "errors": f.errors,
            "p50_ms": _ms(f.p50_ms), "p99_ms": _ms(f.p99_ms), "deployed_at": f.deployed_at,
            "versions": list(f.versions)}


def log_json(line: LogLine) -> dict[str, Any]:
    return {"time": line.time, "node": line.node, "version": line.version, "line": line.line}
