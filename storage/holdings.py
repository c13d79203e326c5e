"""What a node holds: the inventory data model shared by placement and the peer wire.

A :class:`Holdings` is one node's answer to "what do you have": the models it holds
complete (with the origin of each copy and when it was last used), its complete
blobs (with their chunk-index root), its partial blobs (with the bitmap of the chunks
held), the models it is fetching (:class:`Incoming`), the per-model replication
factors it knows of, and its free space. Everything is a frozen value; peers
exchange it as JSON (:mod:`omx.storage.holdings_wire`, which validates untrusted
input with strict bounds).

**The version** (:attr:`Holdings.version`, gossiped in the Serf ``inv`` tag) is a
16-hex digest of what a peer must refetch for: each model's (name, manifest digest,
origin, created_at), each complete blob's (digest, root), each partial blob's digest
and its progress in quarters, each incoming (name, digest), each factor override.
It leaves out what moves all the time and that nobody needs at once: ``last_used``
(touched by every request), free space and the cache limit (placement reads them
from the periodic refresh every peer does anyway), an incoming's ``updated_at``, and
the exact chunk bitmaps (a fetcher that needs the live bitmap asks the peer; the
quarter steps still let swarm peers notice a partial growing). A node with nothing
at all has version ``"0"``.

**Model identity.** ``name`` is the canonical display form (``tiny:latest``,
``ns/m:tag``, ``host/ns/m:tag``) with its original case; two names are the same
model when their :attr:`HeldModel.key` (:func:`model_key`: the canonical form,
lowercased) is equal, as Ollama compares names. A model's *version* is its manifest digest; ``created_at`` orders
versions of one name (the newest wins, see :mod:`omx.storage.placement`) and travels
with replicas, so a copy keeps the creation time of the original.

**Origins.** ``user``: a user put the copy there (create, pull, copy, migrate
target, or anything found in the store without a record); never dropped by
anything automatic. ``replica``: added by replication; dropped again when the model
has more holders than its factor. ``demand``: reserved for copies the router adds
for load; treated as ``replica`` by placement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

from omx.errors import InvalidModelName
from omx.types import BlobDigest

from .names import ModelName

__all__ = [
    "MAX_FACTOR",
    "ORIGINS",
    "PROGRESS_STEPS",
    "BlobHolding",
    "BlobRef",
    "FactorOverride",
    "HeldModel",
    "Holdings",
    "Incoming",
    "Origin",
    "PartialHolding",
    "canonical_name",
    "chunk_count",
    "factor_overrides",
    "merge_factors",
    "model_key",
]

Origin = Literal["user", "replica", "demand"]
ORIGINS: tuple[Origin, ...] = ("user", "replica", "demand")

MAX_FACTOR = 16
"""Largest replication factor (the bound of ``replication.factor`` too)."""

PROGRESS_STEPS = 4
"""A partial blob's progress enters the version in this many steps (quarters)."""


def canonical_name(name: str) -> str:
    """The display form of a model name (``library/tiny`` -> ``tiny:latest``); raises InvalidModelName."""
    return ModelName.parse(name).display


@lru_cache(maxsize=8192)
def model_key(name: str) -> str:
    """The identity of a model name across nodes: its canonical display form, lowercased.

    ``Tiny``, ``tiny:latest`` and ``library/tiny:latest`` share the key ``tiny:latest``.
    """
    try:
        return ModelName.parse(name).display.lower()
    except InvalidModelName:
        return name.lower()


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of a blob of ``size`` bytes cut in ``chunk_size`` pieces (0 for an empty blob)."""
    return -(-size // chunk_size)


@dataclass(frozen=True)
class BlobRef:
    """One blob a model's manifest names (config first), with its size in bytes."""

    digest: BlobDigest
    size: int


@dataclass(frozen=True)
class HeldModel:
    """A model held complete: its manifest and every blob it names are present.

    ``size`` is the manifest's total (as ``/api/tags`` reports it); ``blobs`` the
    distinct blobs. Times are unix seconds: ``created_at`` when this version was
    made at its origin, ``last_used`` the last request that used it here,
    ``modified_at`` the local manifest file's time. ``read_only`` copies live in an
    extra (coexist) root and cannot be removed by this node.
    """

    name: str
    digest: BlobDigest
    size: int
    blobs: tuple[BlobRef, ...]
    origin: Origin = "user"
    created_at: float = 0.0
    last_used: float = 0.0
    modified_at: float = 0.0
    read_only: bool = False

    @property
    def key(self) -> str:
        return model_key(self.name)


@dataclass(frozen=True)
class BlobHolding:
    """A complete blob. ``chunk_size``/``root`` are None until its chunk index is built.

    (Blobs found in a read-only root or written by Ollama get an index on first use;
    the inventory never hashes.) ``read_only``: the blob lives only in an extra root.
    """

    digest: BlobDigest
    size: int
    chunk_size: int | None = None
    root: str | None = None
    read_only: bool = False


@dataclass(frozen=True)
class PartialHolding:
    """A blob being assembled: bit ``i`` of ``have`` (``have[i >> 3] & (1 << (i & 7))``) is chunk ``i``.

    This is the bitmap of the partial-blob state file (see :mod:`omx.storage.partial`).
    ``root`` is the chunk-index root when the chunk digests are known.
    """

    digest: BlobDigest
    size: int
    chunk_size: int
    have: bytes
    root: str | None = None

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def has_chunk(self, i: int) -> bool:
        return 0 <= i < self.chunk_count and bool(self.have[i >> 3] & (1 << (i & 7)))

    @cached_property
    def held_count(self) -> int:
        """How many chunks are held (bits past the last chunk are ignored)."""
        count = self.chunk_count
        return (int.from_bytes(self.have, "little") & ((1 << count) - 1)).bit_count()

    def held(self) -> list[int]:
        """Numbers of the chunks held, ascending."""
        return [i for i in range(self.chunk_count) if self.has_chunk(i)]

    @property
    def held_bytes(self) -> int:
        count = self.chunk_count
        total = self.held_count * self.chunk_size
        if count and self.has_chunk(count - 1):
            total -= count * self.chunk_size - self.size
        return total

    @property
    def progress_step(self) -> int:
        """Progress in :data:`PROGRESS_STEPS` steps (0 … PROGRESS_STEPS - 1 while incomplete)."""
        count = self.chunk_count
        return self.held_count * PROGRESS_STEPS // count if count else 0


@dataclass(frozen=True)
class Incoming:
    """A model this node is fetching (recorded before the first byte, so restarts resume it).

    ``origin`` is what the copy will be once complete; ``updated_at`` is bumped
    while the transfer makes progress (placement ignores an entry that stalled).
    """

    name: str
    digest: BlobDigest
    origin: Origin
    started_at: float
    updated_at: float

    @property
    def key(self) -> str:
        return model_key(self.name)


@dataclass(frozen=True)
class FactorOverride:
    """A model's replication factor as set by a user at ``set_at``; ``factor`` None = back to the default.

    Overrides spread through inventories; the newest ``set_at`` wins everywhere
    (:func:`merge_factors`), ties going to the larger factor.
    """

    model: str
    factor: int | None
    set_at: float

    @property
    def key(self) -> str:
        return model_key(self.model)

    def supersedes(self, other: FactorOverride) -> bool:
        return (self.set_at, self.factor or 0) > (other.set_at, other.factor or 0)


def merge_factors(overrides: Iterable[FactorOverride]) -> dict[str, FactorOverride]:
    """Last-writer-wins merge of overrides from any number of nodes, by model key."""
    merged: dict[str, FactorOverride] = {}
    for o in overrides:
        current = merged.get(o.key)
        if current is None or o.supersedes(current):
            merged[o.key] = o
    return merged


@dataclass(frozen=True)
class Holdings:
    """One node's holdings (see the module docstring). Sequences are sorted; build with :meth:`of`.

    ``free_bytes`` is the free space of the store's filesystem; ``cache_limit`` the
    node's ``models.max_cache_size`` (None when unlimited). :attr:`room` is what
    placement may still put there.
    """

    models: tuple[HeldModel, ...] = ()
    blobs: tuple[BlobHolding, ...] = ()
    partials: tuple[PartialHolding, ...] = ()
    incoming: tuple[Incoming, ...] = ()
    factors: tuple[FactorOverride, ...] = ()
    free_bytes: int = 0
    cache_limit: int | None = None

    @classmethod
    def of(
        cls, *, models: Iterable[HeldModel] = (), blobs: Iterable[BlobHolding] = (),
        partials: Iterable[PartialHolding] = (), incoming: Iterable[Incoming] = (),
        factors: Iterable[FactorOverride] = (), free_bytes: int = 0, cache_limit: int | None = None,
    ) -> Holdings:
        """Holdings in canonical order (so equal contents compare and hash equal)."""
        return cls(
            models=tuple(sorted(models, key=lambda m: (m.key, m.name, m.digest))),
            blobs=tuple(sorted(blobs, key=lambda b: b.digest)),
            partials=tuple(sorted(partials, key=lambda p: p.digest)),
            incoming=tuple(sorted(incoming, key=lambda i: (i.key, i.digest))),
            factors=tuple(sorted(factors, key=lambda f: (f.key, f.set_at))),
            free_bytes=free_bytes, cache_limit=cache_limit,
        )

    # ------------------------------------------------------------ lookups

    @cached_property
    def _models(self) -> dict[str, HeldModel]:
        return {m.key: m for m in self.models}

    @cached_property
    def _blobs(self) -> dict[str, BlobHolding]:
        return {b.digest: b for b in self.blobs}

    @cached_property
    def _partials(self) -> dict[str, PartialHolding]:
        return {p.digest: p for p in self.partials}

    @cached_property
    def _incoming(self) -> dict[str, Incoming]:
        return {i.key: i for i in self.incoming}

    def model(self, name: str) -> HeldModel | None:
        """The model held under ``name`` (compared case-insensitively)."""
        return self._models.get(model_key(name))

    def blob(self, digest: BlobDigest) -> BlobHolding | None:
        return self._blobs.get(digest)

    def partial(self, digest: BlobDigest) -> PartialHolding | None:
        return self._partials.get(digest)

    def incoming_for(self, name: str) -> Incoming | None:
        """The transfer under way for the model ``name``, if any."""
        return self._incoming.get(model_key(name))

    # ------------------------------------------------------------ space

    @property
    def used_bytes(self) -> int:
        """Bytes this node's store takes: its own complete blobs plus the chunks of partial ones."""
        return sum(b.size for b in self.blobs if not b.read_only) + sum(p.held_bytes for p in self.partials)

    @property
    def room(self) -> int:
        """Bytes that may still be added: free disk, bounded by the cache limit when there is one."""
        if self.cache_limit is None:
            return max(0, self.free_bytes)
        return max(0, min(self.free_bytes, self.cache_limit - self.used_bytes))

    def missing_bytes(self, blobs: Iterable[BlobRef]) -> int:
        """Bytes of ``blobs`` this node still lacks (complete blobs count 0, partial ones what is missing)."""
        total = 0
        for ref in blobs:
            if self.blob(ref.digest) is not None:
                continue
            part = self.partial(ref.digest)
            total += ref.size - part.held_bytes if part is not None and part.size == ref.size else ref.size
        return total

    # ------------------------------------------------------------ version

    @cached_property
    def version(self) -> str:
        """16 hex characters over what peers refetch for (see the module docstring); ``"0"`` when empty."""
        if not (self.models or self.blobs or self.partials or self.incoming or self.factors):
            return "0"
        h = hashlib.sha256()
        for m in self.models:
            h.update(f"m\0{m.name}\0{m.digest}\0{m.origin}\0{m.created_at!r}\n".encode())
        for b in self.blobs:
            h.update(f"b\0{b.digest}\0{b.root}\n".encode())
        for p in self.partials:
            h.update(f"p\0{p.digest}\0{p.progress_step}\n".encode())
        for i in self.incoming:
            h.update(f"i\0{i.name}\0{i.digest}\n".encode())
        for f in self.factors:
            h.update(f"f\0{f.key}\0{f.factor}\0{f.set_at!r}\n".encode())
        return h.hexdigest()[:16]


def factor_overrides(holdings: Iterable[Holdings]) -> dict[str, FactorOverride]:
    """The winning override per model key across several nodes' holdings."""
    return merge_factors(f for h in holdings for f in h.factors)
