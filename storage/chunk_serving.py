"""What this node can serve of a blob to peers: complete blobs and held chunks of partial ones.

:func:`served_blob` answers the peer chunk endpoints' question "what do you
hold of ``digest``, and where are its bytes?" without reading them:

* a complete blob (any root) with its chunk index (built on first use);
* a partial blob (a pull or transfer under way, a swarm peer) with its bitmap
  of held chunks and, when known, its chunk index;
* never a blob marked damaged (:mod:`omx.storage.damaged`): that is "not found".

:meth:`ServedBlob.span` turns a chunk range into a byte range of the file,
refusing (416) chunks out of range or not held.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omx.errors import BlobNotFound, IntegrityError, InvalidRequest
from omx.types import BlobDigest

from .blobs import BlobStore
from .chunks import ChunkIndex, chunk_root
from .damaged import is_damaged, mark_damaged
from .names import parse_digest
from .partial import read_partial_state

__all__ = ["MAX_CHUNKS_PER_REQUEST", "ServedBlob", "served_blob"]

MAX_CHUNKS_PER_REQUEST = 1024


@dataclass(frozen=True)
class ServedBlob:
    """A blob (or the held part of one) as a peer may read it."""

    digest: BlobDigest
    size: int
    chunk_size: int
    complete: bool
    index: ChunkIndex | None
    have: bytes | None
    """Bitmap of held chunks (partial blobs); None when complete."""
    path: Path

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def has_chunk(self, i: int) -> bool:
        if not 0 <= i < self.chunk_count:
            return False
        return self.have is None or bool(self.have[i >> 3] & (1 << (i & 7)))

    def span(self, start: int, count: int) -> tuple[int, int]:
        """``(offset, length)`` in :attr:`path` of chunks ``[start, start + count)``; 416 unless all are held."""
        if count < 1 or count > MAX_CHUNKS_PER_REQUEST:
            raise InvalidRequest(f"count must be between 1 and {MAX_CHUNKS_PER_REQUEST}")
        if start < 0 or start + count > self.chunk_count:
            raise InvalidRequest(f"chunks {start}..{start + count - 1} are out of range: blob {self.digest} "
                                 f"has {self.chunk_count} chunk(s)", status=416)
        missing = next((i for i in range(start, start + count) if not self.has_chunk(i)), None)
        if missing is not None:
            raise InvalidRequest(f"chunk {missing} of {self.digest} is not held here yet", status=416)
        offset = start * self.chunk_size
        return offset, min(self.size, (start + count) * self.chunk_size) - offset

    def describe(self) -> dict[str, Any]:
        """The JSON of ``GET /api/peer/blobs/{digest}/index``."""
        held = self.chunk_count if self.have is None else sum(bin(b).count("1") for b in self.have)
        return {
            "digest": self.digest,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "complete": self.complete,
            "chunks_held": held,
            "have": None if self.have is None else base64.b64encode(self.have).decode(),
            "index": None if self.index is None else json.loads(self.index.to_json()),
        }


def served_blob(blobs: BlobStore, digest: BlobDigest) -> ServedBlob:
    """What this node holds of ``digest``; :class:`BlobNotFound` when nothing (or only a damaged copy). Blocking.

    A complete blob whose content turns out not to match its name while its
    index is built is marked damaged and reported as not found.
    """
    digest = parse_digest(digest)
    if is_damaged(blobs, digest):
        raise BlobNotFound(f"blob {digest} is damaged on this node")
    if blobs.has(digest):
        try:
            idx = blobs.index(digest)
        except IntegrityError as exc:
            mark_damaged(blobs, digest, str(exc))
            raise BlobNotFound(f"blob {digest} is damaged on this node") from exc
        except FileNotFoundError as exc:  # deleted while we looked
            raise BlobNotFound(f"blob {digest} not found") from exc
        return ServedBlob(digest, idx.size, idx.chunk_size, True, idx, None, blobs.path(digest))
    state = read_partial_state(blobs, digest)
    if state is None or not state.data_path.is_file():
        raise BlobNotFound(f"blob {digest} not found")
    index = None
    if state.chunks is not None:
        index = ChunkIndex(digest, state.size, state.chunk_size, state.chunks, chunk_root(state.chunks))
    return ServedBlob(digest, state.size, state.chunk_size, False, index, state.have, state.data_path)
