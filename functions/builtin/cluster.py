"""Cluster status endpoints: ``/health``, ``/api/distributed/{status,nodes,metrics,events}``, ``/metrics``.

Values come from the node's :class:`~omx.functions.cluster_view.ClusterView`
(membership, resources, counters) and its scheduler; the shapes are those of
the original cluster-operations docs, with honest values for what omx does
differently (there is no consensus log or leader).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import omx
from omx.errors import InvalidRequest
from omx.functions.call import Call
from omx.functions.cluster_view import ClusterView, NodeRecord, cluster_view, node_json, resources_json
from omx.functions.registry import FunctionRegistry, Reply
from omx.timefmt import iso_time
from omx.types import NodeId

__all__ = ["register"]

CONSENSUS_NOTE = "omx has no consensus log or leader: membership is Serf (SWIM) gossip and every node is equal"


def _view(call: Call) -> ClusterView:
    return cluster_view(call.services.cluster)


def _uptime(call: Call) -> float:
    return round(time.time() - call.services.node.started_at, 3)


def health_services(view: ClusterView) -> dict[str, Any]:
    """The ``services`` object of ``/health`` (also sent as ``node_state`` events)."""
    agent = view.agent()
    alive = [m for m in view.members() if m.status == "alive"]
    peers = sum(1 for m in alive if not m.is_self)
    return {"api": True, "p2p": agent.running, "p2p_peers": peers if agent.running else 0,
            "scheduler": True, "available_nodes": max(1, len(alive)) if agent.running else 1,
            "consensus": False, "consensus_leader": False}


async def health(_body: None, call: Call) -> dict[str, Any]:
    """Node health: services, peers and membership mode."""
    view = _view(call)
    agent = view.agent()
    node = call.services.node
    degraded = agent.should_run and not agent.running
    out: dict[str, Any] = {
        "status": "degraded" if degraded else "healthy",
        "timestamp": iso_time(time.time()),
        "version": omx.__version__,
        "node_id": node.node_id,
        "node_name": node.name,
        "uptime": _uptime(call),
        "services": health_services(view),
        "membership": agent.mode,
        "notes": {"consensus": CONSENSUS_NOTE},
    }
    if agent.reason:
        out["notes"]["membership"] = agent.reason
    return out


def _scheduler_stats(call: Call, requests_processed: int) -> dict[str, Any]:
    sched = call.services.scheduler
    loaded = sched.loaded()
    return {
        "loaded_models": len(loaded),
        "active_requests": sum(m.active_requests for m in loaded),
        "queued_requests": sched.queued,
        "max_queue": sched.max_queue,
        "num_parallel": sched.num_parallel,
        "max_loaded_models": sched.max_loaded_models,
        "requests_processed": requests_processed,
    }


def _routing_stats(call: Call, routed: Any) -> dict[str, Any]:
    """Requests waiting here for a free slot anywhere, and where the requests this node took in ran."""
    holding = call.services.router.holding if call.services.router is not None else None
    rows = [{"model": model, "node": node, "requests": count}
            for model, by_node in sorted(routed.items()) for node, count in sorted(by_node.items())]
    return {"held": holding.total if holding is not None else 0,
            "queue_timeout": holding.timeout_s if holding is not None else None, "requests": rows}


def _runner_stats(call: Call) -> dict[str, Any]:
    sched = call.services.scheduler
    runners = [{
        "model": m.name, "pid": m.pid, "context_length": m.context_length, "active_requests": m.active_requests,
        "requests_served": m.requests_served, "cancelled_generations": m.cancelled_generations,
        "preemptions": m.preemptions,
        "size_vram": m.size_vram, "gpu_layers": m.gpu_layers, "slots": m.slots,
        "expires_at": iso_time(m.expires_at) if m.expires_at is not None else None,
    } for m in sched.loaded()]
    return {"backend": sched.engine.name.replace("-", "_"), "runners": runners}


async def status(_body: None, call: Call) -> dict[str, Any]:
    """Distributed status: membership, scheduler and runner statistics, this node's resources and models."""
    view = _view(call)
    agent = view.agent()
    members = view.members()
    counters = view.counters()
    node = call.services.node
    loaded = {m.name for m in call.services.scheduler.loaded()}
    held = await call.services.store.list_models()
    models = [{"name": e.name, "size": e.size, "loaded": e.name in loaded,
               "requests": counters.model_requests.get(e.name, 0)} for e in held]
    return {
        "distributed_mode": agent.running,
        "fallback_mode": not agent.running,
        "cluster_size": sum(1 for m in members if m.status != "left") if agent.running else 1,
        "active_nodes": [m.id for m in members if m.status == "alive"] if agent.running else [node.node_id],
        "scheduler_stats": _scheduler_stats(call, counters.requests_processed),
        "runner_stats": _runner_stats(call),
        "routing": _routing_stats(call, counters.routed_requests),
        "integration_stats": {"serf_version": agent.serf_version, "agent_restarts": agent.restarts,
                              "gossip_address": agent.gossip_address if agent.running else None,
                              "web": node.web_url, "membership": agent.mode, "agent_state": agent.state,
                              "agent_pid": agent.pid},
        "node": {
            "id": node.node_id, "name": node.name, "role": "peer", "uptime": _uptime(call),
            "started_at": iso_time(node.started_at),
            "resources": resources_json(view.resources(), full=True),
            "services": {"api": node.api_url, "web": node.web_url,
                         "p2p": agent.gossip_address if agent.running else None},
            "connections": view.connections(),
            "models": models,
        },
    }


def load_json(call: Call, rec: NodeRecord) -> dict[str, Any]:
    """A member's ``in_flight`` and ``queued`` requests and ``loaded`` models, from the freshest load known here.

    This node's own are first-hand (``queued`` counts its holding queue too); a peer's come from its
    last load report (``X-Omx-Load`` or the periodic exchange); null where nothing fresh is known.
    """
    router = call.services.router
    if router is None:
        if not rec.is_self:
            return {"in_flight": None, "queued": None, "loaded": None}
        rows = call.services.scheduler.loaded()
        return {"in_flight": sum(m.active_requests for m in rows), "queued": call.services.scheduler.queued,
                "loaded": sorted(m.name for m in rows)}
    load = router.node_load(NodeId(rec.id)) if rec.status == "alive" or rec.is_self else None
    if load is None:
        return {"in_flight": None, "queued": None, "loaded": None}
    held = router.holding.total if rec.is_self and router.holding is not None else 0
    return {"in_flight": sum(m.in_flight for m in load.models.values()),
            "queued": sum(m.queued for m in load.models.values()) + held,
            "loaded": sorted(load.names.get(k, k) for k, m in load.models.items() if m.loaded)}


async def nodes(_body: None, call: Call) -> dict[str, Any]:
    """Every known member with its status, addresses, models held, resources and current load."""
    return {"nodes": [{**node_json(m), **load_json(call, m)} for m in _view(call).members()]}


def metrics_summary(view: ClusterView, call: Call) -> dict[str, Any]:
    """The ``/api/distributed/metrics`` object (also the event stream's ``tick``)."""
    agent = view.agent()
    members = view.members()
    counters = view.counters()
    online = sum(1 for m in members if m.status == "alive") if agent.running else 1
    return {
        "timestamp": iso_time(time.time()),
        "node_id": call.services.node.node_id,
        "connected_peers": max(0, online - 1),
        "is_leader": False,
        "requests_processed": counters.requests_processed,
        "models_loaded": len(call.services.scheduler.loaded()),
        "nodes_total": sum(1 for m in members if m.status != "left") if agent.running else 1,
        "nodes_online": online,
        "uptime": _uptime(call),
        "websocket_connections": counters.websocket_connections,
    }


async def metrics(_body: None, call: Call) -> dict[str, Any]:
    """Cluster metrics summary."""
    return metrics_summary(_view(call), call)


TICK_S = 5.0


def _tick_interval(call: Call) -> float:
    try:
        value = float(call.query.get("interval", TICK_S))
    except ValueError as exc:
        raise InvalidRequest("interval must be a number of seconds") from exc
    return min(60.0, max(0.2, value))


async def _with_ticks(view: ClusterView, call: Call, interval: float) -> AsyncIterator[dict[str, Any]]:
    stream = view.events()
    deadline = time.monotonic() + interval
    try:
        while True:
            try:
                message = await asyncio.wait_for(anext(stream), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                yield {"type": "tick", **metrics_summary(view, call)}
                deadline = time.monotonic() + interval
                continue
            except StopAsyncIteration:
                return
            yield message
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def events(_body: None, call: Call) -> AsyncIterator[dict[str, Any]]:
    """Live stream: a snapshot, then member changes, node state changes and a heartbeat ``tick``.

    The tick (every 5 s, or ``?interval=S``) carries the ``/api/distributed/metrics`` object.
    """
    return _with_ticks(_view(call), call, _tick_interval(call))


async def prometheus(_body: None, call: Call) -> Reply:
    """Prometheus metrics of this node."""
    body, content_type = await _view(call).prometheus()
    return Reply(body, media_type=content_type)


def register(registry: FunctionRegistry, *, metrics_public: bool = True) -> None:
    h = registry.handler
    tags = ("cluster",)
    h("/health", methods=("GET",), auth="public", name="health", tags=tags)(health)
    h("/api/distributed/status", methods=("GET",), name="distributed_status", tags=tags)(status)
    h("/api/distributed/nodes", methods=("GET",), name="distributed_nodes", tags=tags)(nodes)
    h("/api/distributed/metrics", methods=("GET",), name="distributed_metrics", tags=tags)(metrics)
    h("/api/distributed/events", methods=("GET",), response="websocket", name="distributed_events",
      tags=tags)(events)
    h("/metrics", methods=("GET",), response="text", auth="public" if metrics_public else "apikey",
      name="prometheus_metrics", tags=tags)(prometheus)
