"""Traffic counters across the cluster, for the dashboard's per-node charts.

``GET /api/peer/traffic`` (peers only, signed) is one node's counters since it started:
requests served and tokens generated, by model. ``GET /api/distributed/traffic`` asks
every alive member in parallel and answers ``{"nodes": [{"id", "name", "models":
{model: {"requests", "tokens"}}, "error"}]}`` — this node first; a member that did not
answer within a few seconds has ``models: null`` and the reason in ``error``.
Callers turn two samples into rates.
"""

from __future__ import annotations

import asyncio
from typing import Any

from omx.errors import PeerError
from omx.functions.call import Call
from omx.functions.cluster_models import VIEW_TIMEOUT_S
from omx.functions.cluster_view import Counters, cluster_view
from omx.functions.registry import FunctionRegistry
from omx.functions.router import Router
from omx.types import NodeId

__all__ = ["register"]


def _models(counters: Counters) -> dict[str, dict[str, int]]:
    names = set(counters.model_requests) | set(counters.model_tokens)
    return {m: {"requests": counters.model_requests.get(m, 0), "tokens": counters.model_tokens.get(m, 0)}
            for m in sorted(names)}


def _valid(doc: Any) -> dict[str, dict[str, int]] | None:
    """A peer's ``models`` object with only well-formed entries (None: the answer is not one)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        return None
    out: dict[str, dict[str, int]] = {}
    for name, row in doc["models"].items():
        if isinstance(name, str) and isinstance(row, dict):
            req, tok = row.get("requests"), row.get("tokens")
            if isinstance(req, int) and isinstance(tok, int):
                out[name] = {"requests": req, "tokens": tok}
    return out


async def peer_traffic(_body: None, call: Call) -> dict[str, Any]:
    """This node's request and token counters by model."""
    return {"models": _models(cluster_view(call.services.cluster).counters())}


async def _ask(router: Router, node: NodeId) -> tuple[dict[str, dict[str, int]] | None, str | None]:
    try:
        status, doc = await router.peer_json(node, "GET", "/api/peer/traffic", within_s=VIEW_TIMEOUT_S)
    except PeerError as exc:
        return None, str(exc)
    models = _valid(doc) if status == 200 else None
    return (models, None) if models is not None else (None, f"{node} answered {status} without counters")


async def traffic(_body: None, call: Call) -> dict[str, Any]:
    """Every alive member's counters (this node's first)."""
    view = cluster_view(call.services.cluster)
    members = view.members()
    own = next((m for m in members if m.is_self), None)
    rows: list[dict[str, Any]] = [{"id": call.services.node.node_id, "name": own.name if own else None,
                                   "models": _models(view.counters()), "error": None}]
    router = call.services.router
    peers = [m for m in members if m.status == "alive" and not m.is_self]
    if router is not None and peers:
        answers = await asyncio.gather(*(_ask(router, NodeId(m.id)) for m in peers))
        rows += [{"id": m.id, "name": m.name, "models": models, "error": error}
                 for m, (models, error) in zip(peers, answers, strict=True)]
    return {"nodes": rows}


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    h("/api/peer/traffic", methods=("GET",), auth="peer", name="peer_traffic", tags=("peer",))(peer_traffic)
    h("/api/distributed/traffic", methods=("GET",), name="distributed_traffic", tags=("cluster",))(traffic)
