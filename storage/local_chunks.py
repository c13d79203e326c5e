"""Chunks this node already holds, found by their BLAKE3 digest.

A model that differs from a held one in a few tensors shares most of its
chunks with it. :func:`local_chunk_map` reads the store's chunk index files
and maps every chunk digest to one place it can be read from (a complete,
undamaged blob); :class:`LocalChunks` serves them as a
:class:`~omx.protocols.ChunkSource`, so a transfer copies those chunks from
disk instead of fetching them. Every chunk read is checked against its digest
by the caller before it is written, so a local blob that rotted is caught.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from omx.errors import BlobNotFound, IntegrityError, InvalidDigest, NotFound
from omx.types import BlobDigest, ChunkDigest

from .blobs import BlobStore
from .chunks import ChunkIndex
from .damaged import is_damaged
from .names import parse_digest

__all__ = ["LocalChunk", "LocalChunks", "local_chunk_map"]


@dataclass(frozen=True)
class LocalChunk:
    """Where a chunk's bytes are: ``length`` bytes at ``offset`` of ``path`` (blob ``blob``)."""

    blob: BlobDigest
    path: Path
    offset: int
    length: int


def local_chunk_map(blobs: BlobStore, *, exclude: Iterable[BlobDigest] = ()) -> dict[ChunkDigest, LocalChunk]:
    """Every chunk of every indexed, present, undamaged blob (but ``exclude``), by digest. Blocking."""
    skip = {parse_digest(d) for d in exclude}
    found: dict[ChunkDigest, LocalChunk] = {}
    folder = blobs.root / "chunks"
    for entry in sorted(os.scandir(folder), key=lambda e: e.name) if folder.is_dir() else ():
        if not entry.name.endswith(".json"):
            continue
        try:
            digest = parse_digest(entry.name.removesuffix(".json"))
            if digest in skip or is_damaged(blobs, digest):
                continue
            path = blobs.path(digest)
            idx = ChunkIndex.from_json(Path(entry.path).read_bytes())
        except (InvalidDigest, BlobNotFound, IntegrityError, OSError):
            continue
        if idx.blob != digest or path.stat().st_size != idx.size:
            continue
        for i, chunk in enumerate(idx.chunks):
            if chunk not in found:
                offset, length = idx.chunk_range(i)
                found[chunk] = LocalChunk(digest, path, offset, length)
    return found


class LocalChunks:
    """A :class:`~omx.protocols.ChunkSource` over a chunk map (reads run in a thread)."""

    def __init__(self, chunks: Mapping[ChunkDigest, LocalChunk]) -> None:
        self.chunks = chunks

    def holds(self, index: ChunkIndex) -> set[int]:
        """Numbers of ``index``'s chunks that can be copied from here."""
        return {i for i, c in enumerate(index.chunks) if c in self.chunks}

    def _read(self, chunk: ChunkDigest, length: int) -> bytes:
        where = self.chunks.get(chunk)
        if where is None or where.length != length:
            raise NotFound(f"chunk {chunk} is not held locally")
        try:
            fd = os.open(where.path, os.O_RDONLY)
            try:
                data = os.pread(fd, length, where.offset)
            finally:
                os.close(fd)
        except OSError as exc:  # the blob went away (deleted, collected) since the map was built
            raise NotFound(f"chunk {chunk} is no longer readable locally: {exc.strerror or exc}") from exc
        if len(data) != length:
            raise IntegrityError(f"blob {where.blob} is shorter than its chunk index says")
        return data

    async def read_chunk(self, blob: BlobDigest, chunk: ChunkDigest, offset: int, length: int) -> bytes:
        """The bytes of ``chunk`` from whichever local blob has it (``blob``/``offset`` are the target's)."""
        return await asyncio.to_thread(self._read, chunk, length)
