"""Cluster membership administration and the peer inventory endpoint.

``POST /api/cluster/join`` / ``POST /api/cluster/leave`` / ``GET /api/cluster/token``
are what ``omx cluster join|leave|token`` call on a running node: auth
``admin`` (an API key when keys are configured, else loopback clients only).
``GET /api/cluster/ca`` serves the cluster CA certificate (PEM) to anyone: it is public.
``GET /api/peer/inventory`` answers peers only (HMAC-signed requests).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from omx.functions.call import Call
from omx.functions.cluster_view import cluster_view
from omx.functions.registry import FunctionRegistry, Reply

__all__ = ["JoinRequest", "register"]


class JoinRequest(BaseModel):
    """Body of ``POST /api/cluster/join``."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=8192)


async def join(body: JoinRequest, call: Call) -> dict[str, Any]:
    """Join the cluster of a join token (the node's secret is replaced and its agent restarted)."""
    return await cluster_view(call.services.cluster).join(body.token)


async def leave(_body: None, call: Call) -> dict[str, Any]:
    """Leave the cluster gracefully; the node keeps serving on its own."""
    return await cluster_view(call.services.cluster).leave()


async def token(_body: None, call: Call) -> dict[str, Any]:
    """A join token for this node's cluster (it contains the cluster secret)."""
    return {"token": cluster_view(call.services.cluster).join_token()}


async def ca(_body: None, call: Call) -> Reply:
    """The cluster CA certificate (PEM) that HTTP/3 clients verify this node's certificate against."""
    return Reply(cluster_view(call.services.cluster).ca_certificate(), media_type="application/x-pem-file")


async def inventory(_body: None, call: Call) -> dict[str, Any]:
    """What this node holds (models with digests and sizes), with a version, and its resources."""
    return await cluster_view(call.services.cluster).inventory()


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    tags = ("cluster",)
    h("/api/cluster/join", request=JoinRequest, auth="admin", name="cluster_join", tags=tags)(join)
    h("/api/cluster/leave", methods=("POST",), auth="admin", name="cluster_leave", tags=tags)(leave)
    h("/api/cluster/token", methods=("GET",), auth="admin", name="cluster_token", tags=tags)(token)
    h("/api/cluster/ca", methods=("GET",), response="text", auth="public", name="cluster_ca", tags=tags)(ca)
    h("/api/peer/inventory", methods=("GET",), auth="peer", name="peer_inventory", tags=("peer",))(inventory)
