"""Registry transfers: ``POST /api/pull``, ``POST /api/push`` and ``GET /api/pulls``.

The runtime hands a :class:`~omx.storage.registry.RegistryClient` over as
``Services.registry`` (build it with :func:`make_registry_client`).
Pull and push stream Ollama's progress lines; with ``"stream": false`` only
the final status is returned. ``GET /api/pulls`` (an omx addition) lists the
models being downloaded here, for ``omx proxy list``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from omx.errors import InvalidRequest, OmxError
from omx.functions.call import Call
from omx.functions.registry import FunctionRegistry
from omx.functions.schemas import PullRequest, PushRequest
from omx.protocols import RegistryTransport
from omx.storage import ModelName, ModelStore
from omx.storage.registry import Credentials, ProgressEvent, RegistryClient, RegistryOptions
from omx.storage.registry.pending import FileManifests

__all__ = ["make_registry_client", "register"]


def make_registry_client(
    store: ModelStore,
    transport: RegistryTransport,
    *,
    default_registry: str = "registry.ollama.ai",
    insecure: bool = False,
    concurrency: int = 3,
    download_timeout: float = 1800.0,
    on_bytes: Callable[[int], None] | None = None,
    **tuning: Any,
) -> RegistryClient:
    """The registry client of a node: pulls into ``store``'s writable root, pushes from any root.

    ``on_bytes`` is told the size of every chunk downloaded (metrics). ``tuning`` sets the other
    :class:`RegistryOptions` fields (``stall_timeout``,
    ``max_retries``, ``backoff``…).
    """
    options = RegistryOptions(default_registry=default_registry, insecure=insecure,
                              concurrency=concurrency, download_timeout=download_timeout, **tuning)
    manifests = FileManifests(store.root, store.extra_roots)
    return RegistryClient(store.blobs, transport, options, manifests=manifests, on_bytes=on_bytes)


def _client(call: Call) -> RegistryClient:
    client = call.services.registry
    if client is None:
        raise OmxError("this node has no registry client configured")
    return client


def _credentials(body: PullRequest) -> Credentials | None:
    if body.username:
        return Credentials(body.username, body.password or "")
    return None


async def _respond(events: AsyncIterator[ProgressEvent], stream: bool) -> Any:
    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for event in events:
            yield event.to_ollama()

    if stream:
        return lines()
    last: dict[str, Any] = {}
    async for item in lines():
        last = item
    return last


async def _last(lines: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    last: dict[str, Any] = {}
    async for item in lines:
        last = item
    return last


async def pull(body: PullRequest, call: Call) -> Any:
    """Download a model: from the cluster's peers when an alive peer holds it, else from its registry."""
    if not body.model:
        raise InvalidRequest("model is required")
    ModelName.parse(body.model)  # a bad name is a 400 before any line is streamed
    replication = call.services.replication
    from_peers = replication.peer_pull(body.model) if replication is not None else None
    if from_peers is not None:
        return from_peers if body.stream else await _last(from_peers)
    client = _client(call)
    client.parse(body.model)
    events = client.pull(body.model, insecure=body.insecure, credentials=_credentials(body))
    return await _respond(events, body.stream)


async def push(body: PushRequest, call: Call) -> Any:
    """Upload a model to a registry."""
    if not body.model:
        raise InvalidRequest("model is required")
    client = _client(call)
    client.parse(body.model)
    events = client.push(body.model, insecure=body.insecure, credentials=_credentials(body))
    return await _respond(events, body.stream)


async def pulls(_body: None, call: Call) -> dict[str, Any]:
    """Models being downloaded to this node (running or interrupted pulls)."""
    client = _client(call)
    pending = await asyncio.to_thread(client.pending.list, client.blobs)
    return {"pulls": [{
        "name": p.name.display,
        "model": p.name.display,
        "size": p.total,
        "completed": p.completed,
        "status": "downloading",
    } for p in pending]}


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    h("/api/pull", request=PullRequest, response="ndjson", name="pull", tags=("ollama",))(pull)
    h("/api/push", request=PushRequest, response="ndjson", name="push", tags=("ollama",))(push)
    h("/api/pulls", methods=("GET",), name="pulls", tags=("omx",))(pulls)
