"""The JSON form of :class:`~omx.storage.holdings.Holdings`: written for peers, parsed from them.

Parsing is strict (pydantic strict mode, bounded sizes, counts and lengths, every
name and digest checked) because the document comes from the network: a peer with
a bug or a stolen key can at worst be refused, never make this node allocate
without bound or keep a value placement would trip on.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omx.errors import InvalidModelName, PeerError
from omx.types import BlobDigest

from .holdings import (
    MAX_FACTOR,
    BlobHolding,
    BlobRef,
    FactorOverride,
    HeldModel,
    Holdings,
    Incoming,
    PartialHolding,
    chunk_count,
)
from .names import ModelName

__all__ = ["holdings_from_json", "holdings_to_json"]

MAX_BYTES = 1 << 53
"""Largest blob, model or disk size accepted (8 PiB)."""
MAX_TIME = float(1 << 40)
MIN_CHUNK, MAX_CHUNK = 64 * 1024, 256 * 1024 * 1024
MAX_MODELS = 10_000
MAX_BLOBS = 100_000
MAX_BLOBS_PER_MODEL = 1024
MAX_BITMAP_BYTES = 1 << 20
"""Up to 8M chunks per partial blob (64 TiB at 8 MiB chunks)."""

Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Time = Annotated[float, Field(ge=0.0, le=MAX_TIME, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=600)]
OriginIn = Literal["user", "replica", "demand"]


class _In(BaseModel):
    # Unknown fields are ignored so a newer peer can add some; known ones are strict.
    model_config = ConfigDict(strict=True, extra="ignore")


class _BlobRefIn(_In):
    digest: Digest
    size: Size


class _ModelIn(_In):
    name: Name
    digest: Digest
    size: Size
    blobs: list[_BlobRefIn] = Field(min_length=1, max_length=MAX_BLOBS_PER_MODEL)
    origin: OriginIn = "user"
    created_at: Time = 0.0
    last_used: Time = 0.0
    modified_at: Time = 0.0
    read_only: bool = False


class _BlobIn(_In):
    digest: Digest
    size: Size
    chunk_size: Annotated[int, Field(ge=MIN_CHUNK, le=MAX_CHUNK)] | None = None
    root: Hex64 | None = None
    read_only: bool = False


class _PartialIn(_In):
    digest: Digest
    size: Size
    chunk_size: Annotated[int, Field(ge=MIN_CHUNK, le=MAX_CHUNK)]
    have: Annotated[str, Field(max_length=4 * (MAX_BITMAP_BYTES // 3 + 1))]
    root: Hex64 | None = None


class _IncomingIn(_In):
    name: Name
    digest: Digest
    origin: OriginIn
    started_at: Time
    updated_at: Time


class _FactorIn(_In):
    model: Name
    factor: Annotated[int, Field(ge=1, le=MAX_FACTOR)] | None
    set_at: Time


class _HoldingsIn(_In):
    models: list[_ModelIn] = Field(default_factory=list, max_length=MAX_MODELS)
    blobs: list[_BlobIn] = Field(default_factory=list, max_length=MAX_BLOBS)
    partials: list[_PartialIn] = Field(default_factory=list, max_length=MAX_MODELS)
    incoming: list[_IncomingIn] = Field(default_factory=list, max_length=MAX_MODELS)
    factors: list[_FactorIn] = Field(default_factory=list, max_length=MAX_MODELS)
    free_bytes: Size = 0
    cache_limit: Size | None = None


def _name(text: str) -> str:
    try:
        return ModelName.parse(text).display
    except InvalidModelName as exc:
        raise PeerError(f"peer inventory names an invalid model: {exc}") from exc


def _bitmap(p: _PartialIn) -> bytes:
    try:
        have = base64.b64decode(p.have, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PeerError(f"peer inventory has a malformed chunk bitmap for {p.digest}") from exc
    count = chunk_count(p.size, p.chunk_size)
    if len(have) != -(-count // 8):
        raise PeerError(f"peer inventory's chunk bitmap for {p.digest} does not fit {count} chunks")
    return have


def _unique(kind: str, keys: list[str]) -> None:
    if len(set(keys)) != len(keys):
        raise PeerError(f"peer inventory lists a {kind} twice")


def holdings_from_json(doc: Any) -> Holdings:
    """Validate a peer's holdings document (see the module docstring)."""
    if not isinstance(doc, dict):
        raise PeerError("peer inventory is not a JSON object")
    try:
        raw = _HoldingsIn.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PeerError(f"peer inventory is malformed at {where}: {first['msg']}") from exc
    models = [HeldModel(
        name=_name(m.name), digest=BlobDigest(m.digest), size=m.size,
        blobs=tuple(BlobRef(BlobDigest(b.digest), b.size) for b in m.blobs), origin=m.origin,
        created_at=m.created_at, last_used=m.last_used, modified_at=m.modified_at, read_only=m.read_only,
    ) for m in raw.models]
    _unique("model", [m.key for m in models])
    _unique("blob", [b.digest for b in raw.blobs])
    _unique("partial blob", [p.digest for p in raw.partials])
    incoming = [Incoming(_name(i.name), BlobDigest(i.digest), i.origin, i.started_at, i.updated_at)
                for i in raw.incoming]
    _unique("incoming model", [i.key for i in incoming])
    factors = [FactorOverride(_name(f.model), f.factor, f.set_at) for f in raw.factors]
    _unique("factor", [f.key for f in factors])
    return Holdings.of(
        models=models,
        blobs=[BlobHolding(BlobDigest(b.digest), b.size, b.chunk_size, b.root, b.read_only) for b in raw.blobs],
        partials=[PartialHolding(BlobDigest(p.digest), p.size, p.chunk_size, _bitmap(p), p.root)
                  for p in raw.partials],
        incoming=incoming, factors=factors, free_bytes=raw.free_bytes, cache_limit=raw.cache_limit,
    )


def holdings_to_json(h: Holdings) -> dict[str, Any]:
    """The JSON document :func:`holdings_from_json` reads back to an equal :class:`Holdings`."""
    return {
        "version": h.version,
        "models": [{
            "name": m.name, "digest": m.digest, "size": m.size,
            "blobs": [{"digest": b.digest, "size": b.size} for b in m.blobs],
            "origin": m.origin, "created_at": m.created_at, "last_used": m.last_used,
            "modified_at": m.modified_at, "read_only": m.read_only,
        } for m in h.models],
        "blobs": [{"digest": b.digest, "size": b.size, "chunk_size": b.chunk_size, "root": b.root,
                   "read_only": b.read_only} for b in h.blobs],
        "partials": [{"digest": p.digest, "size": p.size, "chunk_size": p.chunk_size,
                      "have": base64.b64encode(p.have).decode(), "root": p.root} for p in h.partials],
        "incoming": [{"name": i.name, "digest": i.digest, "origin": i.origin, "started_at": i.started_at,
                      "updated_at": i.updated_at} for i in h.incoming],
        "factors": [{"model": f.model, "factor": f.factor, "set_at": f.set_at} for f in h.factors],
        "free_bytes": h.free_bytes,
        "cache_limit": h.cache_limit,
    }
