"""Custom functions on a node: the table, sandboxed pools per version, distribution, logs and figures.

:func:`function_host` builds the node's :class:`FunctionsHost` (what
``Services.functions`` holds) from the node's parts.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from omx.functions.builtin.custom_functions import CALL_PATH
from omx.functions.call import Services
from omx.functions.dispatch import Dispatcher
from omx.functions.registry import FunctionRegistry
from omx.functions.router import PeerLink
from omx.runtime.functions_host.context import NodeContextHost
from omx.runtime.functions_host.host import PULL_S, FunctionsHost
from omx.runtime.functions_host.observe import FunctionLogs, FunctionMetrics
from omx.runtime.functions_host.peers import PeerFunctions
from omx.runtime.functions_host.sandbox import Sandbox
from omx.storage.functions_store import FunctionStore

__all__ = ["PULL_S", "FunctionsHost", "function_host", "reserved_by"]

_PARAM = re.compile(r"{[a-zA-Z_][a-zA-Z0-9_]*(:path)?}")


def reserved_by(registry: FunctionRegistry) -> Callable[[str, str], str | None]:
    """Tells whether a built-in handler owns a function name or path (and says which), else None."""
    patterns = []
    for spec in registry:
        if spec.path == CALL_PATH:
            continue
        regex = _PARAM.sub(lambda m: ".+" if m.group(1) else "[^/]+", re.escape(spec.path).replace(r"\{", "{")
                           .replace(r"\}", "}"))
        patterns.append((re.compile(f"^{regex}$"), spec.name, spec.path))
    names = {spec.name for spec in registry}

    def reserved(name: str, path: str) -> str | None:
        if name in names:
            return f"'{name}' is the name of a built-in handler; choose another name"
        for pattern, owner, route in patterns:
            if pattern.match(path):
                return f"path {path} is served by the built-in handler '{owner}' ({route})"
        return None

    return reserved


def function_host(node_id: str, home: Path, registry: FunctionRegistry, dispatcher: Dispatcher,
                  services: Callable[[], Services | None], link: PeerLink | None,
                  alive_peers: Callable[[], list[str]], metrics: CollectorRegistry | None, *,
                  on_sync: Callable[[str, int], None] | None = None,
                  publish: Callable[[str], Awaitable[None]] | None = None,
                  peer_version: Callable[[str], str | None] = lambda _node: None) -> FunctionsHost:
    """The node's function host; sources and table under ``home/functions``.

    ``publish`` gossips the table's digest, ``peer_version`` reads the one a peer gossips (so unchanged tables
    are not pulled); ``on_sync`` counts the tables pulled.
    """
    logs = FunctionLogs(node_id)
    host: FunctionsHost | None = None

    def version_of(name: str) -> str:
        return host.version_of(name) if host is not None else ""

    ctx = NodeContextHost(node_id, registry, dispatcher, services, logs, version_of)
    host = FunctionsHost(node_id, FunctionStore(home / "functions"), Sandbox(ctx),
                         peers=PeerFunctions(link, alive_peers, on_sync=on_sync, version_of=peer_version)
                         if link is not None else None,
                         metrics=FunctionMetrics(metrics), logs=logs, reserved=reserved_by(registry),
                         publish=publish)
    return host
