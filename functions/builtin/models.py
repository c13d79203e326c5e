"""Model management: ``/api/tags``, ``show``, ``create``, ``copy``, ``delete``,
``blobs``, ``ps``, ``version`` and ``/``.

``tags``, ``ps`` and ``show`` answer for the whole cluster on a node with a
router (:mod:`omx.functions.cluster_models`), and for this node alone on a
peer's hop request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import omx
from omx.errors import InvalidRequest, ModelNotFound, ServiceBusy
from omx.functions.call import Call
from omx.functions.cluster_models import cluster_ps, delete_elsewhere, held_by, remote_tags, show_elsewhere
from omx.functions.registry import FunctionRegistry, Reply
from omx.functions.schemas import CopyRequest, CreateRequest, DeleteRequest, ShowRequest
from omx.storage import ModelDetails, model_row, parse_digest
from omx.timefmt import iso_time

__all__ = ["register"]

_NEVER = datetime(2318, 1, 1, tzinfo=UTC)
"""``expires_at`` of a model kept loaded for ever (Ollama's far-future date)."""


async def tags(_body: None, call: Call) -> dict[str, Any]:
    """List the models held in the cluster: this node's first, then those only peers hold (``held_by``)."""
    entries = await call.services.store.list_models()
    rows = [{**e.to_dict(), "status": "ready"} for e in entries]  # the docs' status beside Ollama's
    router = call.services.router
    if router is None or call.hop:
        return {"models": rows}
    rows = [{**r, "held_by": sorted({*held_by(router, r["name"]), router.node_id})} for r in rows]
    return {"models": rows + await remote_tags(router, [e.name for e in entries])}


async def show(body: ShowRequest, call: Call) -> dict[str, Any]:
    """Show a model's modelfile, parameters, template, details and GGUF metadata (from a holder if not here)."""
    if not body.model:
        raise InvalidRequest("model is required")
    try:
        return await call.services.store.show(body.model, verbose=body.verbose)
    except ModelNotFound:
        router = call.services.router
        if router is None or call.hop:
            raise
        found = await show_elsewhere(router, body.model, call.body_bytes)
        if found is None:
            raise
        return found


async def create(body: CreateRequest, call: Call) -> Any:
    """Create a model from uploaded blobs, an existing model, or a Modelfile."""
    if not body.model:
        raise InvalidRequest("model is required")
    if body.path and not body.modelfile:
        raise InvalidRequest("'path' is not supported: send the Modelfile text in 'modelfile', or use 'files'")
    statuses = call.services.store.create(body.model, body)

    async def stream() -> AsyncIterator[dict[str, Any]]:
        async for status in statuses:
            yield {"status": status}

    if body.stream:
        return stream()
    last: dict[str, Any] = {}
    async for item in stream():
        last = item
    return last


async def copy(body: CopyRequest, call: Call) -> Reply:
    """Copy a model under a new name."""
    await call.services.store.copy(body.source, body.destination)
    return Reply(None)


async def delete(body: DeleteRequest, call: Call) -> Reply:
    """Delete a model from every alive node of the cluster; blobs nothing else references are collected.

    A peer's hop request deletes it from that node only. Every node asked also stops placing replicas of the
    model for a while, so none is re-added from a copy not yet deleted.
    """
    if not body.model:
        raise InvalidRequest("model is required")
    if call.services.replication is not None:
        call.services.replication.forget(body.model)
    router = call.services.router
    if router is None or call.hop:
        await _delete_here(body.model, call)
        return Reply(None)
    held_elsewhere, failures = await delete_elsewhere(router, call.body_bytes)
    try:
        await _delete_here(body.model, call)
    except ModelNotFound:
        if not held_elsewhere and not failures:
            raise
    if failures:
        raise ServiceBusy(f"model '{body.model}' was not deleted everywhere: {'; '.join(failures)}", retry_after=5)
    return Reply(None)


async def _delete_here(model: str, call: Call) -> None:
    store = call.services.store
    loaded_as = (await store.resolve(model)).name.display  # "tiny" is loaded as "tiny:latest"
    await call.services.scheduler.unload(loaded_as)
    await store.delete(model)


async def blob_head(_body: None, call: Call) -> Reply:
    """Whether this node holds a blob."""
    digest = parse_digest(call.path_params["digest"])
    return Reply(None, status=200 if call.services.store.blobs.has(digest) else 404)


async def blob_upload(_body: None, call: Call) -> Reply:
    """Upload a blob; it is kept only if its content matches the digest in the path."""
    digest = parse_digest(call.path_params["digest"])
    blobs = call.services.store.blobs
    if blobs.has(digest):
        # Read what the client sends anyway: a body left unread ends the keep-alive connection mid-upload,
        # and the client's next request on it fails (ollama-python's create_blob posts without asking first).
        async for _ in call.stream_body():
            pass
        return Reply(None, status=200)
    await blobs.write(call.stream_body(), expected=digest)
    return Reply(None, status=201)


async def ps(_body: None, call: Call) -> dict[str, Any]:
    """List the models loaded in memory on every node (each row with its ``node``)."""
    store = call.services.store
    rows = []
    for loaded in call.services.scheduler.loaded():
        try:
            details: ModelDetails | None = (await store.resolve(loaded.name)).details
        except Exception:  # noqa: BLE001 - a model deleted while loaded still shows
            details = None
        rows.append({
            **model_row(loaded.name, size=loaded.size, digest=loaded.digest, details=details),
            "expires_at": iso_time(loaded.expires_at if loaded.expires_at is not None else _NEVER),
            "size_vram": loaded.size_vram,
            "context_length": loaded.context_length,
        })
    router = call.services.router
    if router is None or call.hop:
        return {"models": rows}
    return {"models": await cluster_ps(router, rows)}


async def version(_body: None, _call: Call) -> dict[str, str]:
    """The node's version."""
    return {"version": omx.__version__}


async def root(_body: None, _call: Call) -> Reply:
    """Liveness banner, as Ollama's server answers it."""
    return Reply("Ollama is running", media_type="text/plain; charset=utf-8")


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    h("/", methods=("GET",), response="text", auth="public", name="root", tags=("ollama",))(root)
    h("/api/version", methods=("GET",), auth="public", name="version", tags=("ollama",))(version)
    h("/api/tags", methods=("GET",), name="tags", hop=True, tags=("ollama",))(tags)
    h("/api/ps", methods=("GET",), name="ps", hop=True, tags=("ollama",))(ps)
    h("/api/show", request=ShowRequest, name="show", hop=True, tags=("ollama",))(show)
    h("/api/create", request=CreateRequest, response="ndjson", name="create", tags=("ollama",))(create)
    h("/api/copy", request=CopyRequest, name="copy", tags=("ollama",))(copy)
    h("/api/delete", methods=("DELETE",), request=DeleteRequest, name="delete", hop=True, tags=("ollama",))(delete)
    h("/api/blobs/{digest}", methods=("HEAD",), name="blob_head", tags=("ollama",))(blob_head)
    h("/api/blobs/{digest}", methods=("POST",), body="raw", name="blob_upload", tags=("ollama",))(blob_upload)
