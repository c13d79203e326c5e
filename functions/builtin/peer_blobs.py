"""Peer endpoints of chunk transfer (HMAC-signed requests from cluster members only).

``GET /api/peer/blobs/{digest}/index``
    What this node holds of a blob: ``{"digest", "size", "chunk_size",
    "complete", "chunks_held", "have", "index"}``. ``have`` is the base64
    bitmap of held chunks of a partial blob (bit ``i & 7`` of byte ``i >> 3``;
    null when complete); ``index`` the chunk index document (null for a partial
    blob whose index is not known yet).
``GET /api/peer/blobs/{digest}/chunks?start=I&count=N``
    The raw bytes of chunks ``[I, I + N)`` (``count`` defaults to 1), sent
    zero-copy where the server allows. A partial blob serves only chunks it
    holds: anything else is 416 ``{"error"}``.
``GET /api/peer/manifests/{name}``
    The exact manifest bytes of a model (``X-Omx-Manifest-Digest`` carries their
    sha256), so a puller rebuilds the model byte for byte.

A blob marked damaged (:mod:`omx.storage.damaged`) is never served: 404.
Bytes served are reported to ``Services.transfer_stats`` when set.
"""

from __future__ import annotations

import asyncio
from typing import Any

from omx.errors import InvalidRequest
from omx.functions.call import Call
from omx.functions.cluster_view import ServedBytes
from omx.functions.registry import FileRange, FunctionRegistry, Reply
from omx.storage import MANIFEST_MEDIA_TYPE, ModelName, manifest_digest, parse_digest
from omx.storage.chunk_serving import MAX_CHUNKS_PER_REQUEST, served_blob
from omx.storage.registry.pending import FileManifests

__all__ = ["CHUNK_COUNT_HEADER", "CHUNK_START_HEADER", "MANIFEST_DIGEST_HEADER", "ServedBytes", "register"]

CHUNK_START_HEADER = "X-Omx-Chunk-Start"
CHUNK_COUNT_HEADER = "X-Omx-Chunk-Count"
MANIFEST_DIGEST_HEADER = "X-Omx-Manifest-Digest"


def _int_param(call: Call, name: str, default: int | None) -> int:
    text = call.query.get(name)
    if text is None:
        if default is None:
            raise InvalidRequest(f"query parameter '{name}' is required")
        return default
    if not text.isdigit() or len(text) > 12:
        raise InvalidRequest(f"query parameter '{name}' must be a non-negative integer")
    return int(text)


async def blob_index(_body: None, call: Call) -> dict[str, Any]:
    """A blob's chunk index and the chunks this node holds of it."""
    digest = parse_digest(call.path_params["digest"])
    served = await asyncio.to_thread(served_blob, call.services.store.blobs, digest)
    return served.describe()


async def blob_chunks(_body: None, call: Call) -> FileRange:
    """The raw bytes of a range of a blob's chunks."""
    digest = parse_digest(call.path_params["digest"])
    start = _int_param(call, "start", None)
    count = _int_param(call, "count", 1)
    if not 1 <= count <= MAX_CHUNKS_PER_REQUEST:
        raise InvalidRequest(f"count must be between 1 and {MAX_CHUNKS_PER_REQUEST}")
    served = await asyncio.to_thread(served_blob, call.services.store.blobs, digest)
    offset, length = served.span(start, count)
    sink = call.services.transfer_stats
    headers = {CHUNK_START_HEADER: str(start), CHUNK_COUNT_HEADER: str(count)}
    return await asyncio.to_thread(FileRange.open, served.path, offset, length, headers=headers,
                                   on_sent=sink.bytes_served if sink is not None else None)


async def manifest(_body: None, call: Call) -> Reply:
    """The exact bytes of a model's manifest."""
    name = ModelName.parse(call.path_params["name"])
    store = call.services.store
    data = await asyncio.to_thread(FileManifests(store.root, store.extra_roots).read_manifest, name)
    return Reply(body=data, media_type=MANIFEST_MEDIA_TYPE,
                 headers={MANIFEST_DIGEST_HEADER: manifest_digest(data)})


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    tags = ("peer",)
    h("/api/peer/blobs/{digest}/index", methods=("GET",), auth="peer", name="peer_blob_index", tags=tags)(blob_index)
    h("/api/peer/blobs/{digest}/chunks", methods=("GET",), auth="peer", response="file", name="peer_blob_chunks",
      tags=tags)(blob_chunks)
    h("/api/peer/manifests/{name:path}", methods=("GET",), auth="peer", name="peer_manifest", tags=tags)(manifest)
