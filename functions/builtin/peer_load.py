"""``GET /api/peer/load``: this node's load, as peers' routers rank nodes by it (peers only, HMAC-signed)."""

from __future__ import annotations

from typing import Any

from omx.errors import OmxError
from omx.functions.call import Call
from omx.functions.registry import FunctionRegistry
from omx.functions.routing import load_to_json

__all__ = ["register"]


async def load(_body: None, call: Call) -> dict[str, Any]:
    """This node's load: per model loaded or not, requests in flight and queued, slots; free memory."""
    router = call.services.router
    if router is None:
        raise OmxError("this node runs without a router", status=503)
    return load_to_json(router.local_load())


def register(registry: FunctionRegistry) -> None:
    registry.handler("/api/peer/load", methods=("GET",), auth="peer", name="peer_load", tags=("peer",))(load)
