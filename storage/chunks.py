"""BLAKE3 chunk indexes: a blob cut in fixed-size chunks, each named by its hash.

Definitions (stable; peers compare them):

* chunk ``i`` is bytes ``[i * chunk_size, min((i + 1) * chunk_size, size))`` of the
  blob; every chunk but the last is exactly ``chunk_size`` bytes; an empty blob
  has no chunks;
* a chunk digest is the 32-byte BLAKE3 hash of the chunk, written as 64
  lowercase hex characters;
* the root is the BLAKE3 hash of the concatenation of the 32-byte (binary)
  chunk digests in order, in hex; for an empty blob it is ``BLAKE3(b"")``.

:class:`BlobHasher` computes the blob's sha256 and every chunk digest in one
pass. Both hash libraries release the GIL on large buffers, so the sha256 of a
buffer runs on a helper thread while the chunk hashes run on the caller's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

from omx.errors import IntegrityError
from omx.types import BlobDigest, ChunkDigest

from .names import parse_digest

__all__ = ["DEFAULT_CHUNK_SIZE", "BlobHasher", "ChunkIndex", "chunk_root", "index_file", "verify_chunk"]

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
"""8 MiB: see ``bench/chunk_size.py`` for the measurements behind it."""

_MIN_CHUNK, _MAX_CHUNK = 64 * 1024, 256 * 1024 * 1024
# Below this, a second thread costs more than it saves.
_PARALLEL_THRESHOLD = 1 << 20


def chunk_root(chunks: Sequence[str]) -> str:
    """The root hash over an ordered list of hex chunk digests (see module docstring)."""
    h = blake3()
    for c in chunks:
        h.update(bytes.fromhex(c))
    return h.hexdigest()


def verify_chunk(data: bytes | memoryview, digest: str) -> bool:
    """Whether ``data`` hashes to the hex BLAKE3 ``digest``."""
    return blake3(data).hexdigest() == digest


def _check_chunk_size(chunk_size: int) -> None:
    if not (_MIN_CHUNK <= chunk_size <= _MAX_CHUNK):
        raise ValueError(f"chunk size {chunk_size} outside [{_MIN_CHUNK}, {_MAX_CHUNK}]")


@dataclass(frozen=True)
class ChunkIndex:
    """The ordered chunk list of one blob, plus its root."""

    blob: BlobDigest
    size: int
    chunk_size: int
    chunks: tuple[ChunkDigest, ...]
    root: str

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i``."""
        if not 0 <= i < len(self.chunks):
            raise IndexError(f"chunk {i} out of range (blob has {len(self.chunks)})")
        offset = i * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def to_json(self) -> bytes:
        doc = {
            "version": 1,
            "algorithm": "blake3",
            "blob": self.blob,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "root": self.root,
            "chunks": list(self.chunks),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ChunkIndex:
        """Parse and check an index (counts and root must agree); raises IntegrityError."""
        try:
            doc: Any = json.loads(data)
            if doc.get("version") != 1 or doc.get("algorithm") != "blake3":
                raise ValueError("unknown index version or algorithm")
            idx = cls(
                blob=parse_digest(doc["blob"]),
                size=int(doc["size"]),
                chunk_size=int(doc["chunk_size"]),
                chunks=tuple(ChunkDigest(str(c)) for c in doc["chunks"]),
                root=str(doc["root"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"malformed chunk index: {e}") from e
        idx.validate()
        return idx

    def validate(self) -> None:
        """Raise IntegrityError unless the counts, digests and root are consistent."""
        if self.size < 0 or self.chunk_size <= 0:
            raise IntegrityError("chunk index has a negative size or a bad chunk size")
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            raise IntegrityError(
                f"chunk index of {self.blob} lists {len(self.chunks)} chunks, expected {expected}"
            )
        for c in self.chunks:
            if len(c) != 64 or c.strip("0123456789abcdef"):
                raise IntegrityError(f"chunk index of {self.blob} has a malformed chunk digest")
        if chunk_root(self.chunks) != self.root:
            raise IntegrityError(f"chunk index of {self.blob} has a wrong root")


class BlobHasher:
    """Computes sha256 of a whole blob and the BLAKE3 of each chunk in one pass.

    Feed it buffers of any size with :meth:`update` (large ones, a few MiB, are
    fastest; they are not copied), then call :meth:`finish` once. Not thread-safe;
    :meth:`close` (or ``with``) releases the helper thread.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, *, parallel: bool = True) -> None:
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.size = 0
        self._sha = hashlib.sha256()
        self._chunk = blake3()
        self._in_chunk = 0
        self._chunks: list[ChunkDigest] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256") if parallel else None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash the next bytes of the blob. ``data`` must not change until this returns."""
        view = memoryview(data).cast("B")
        n = len(view)
        if n == 0:
            return
        fut = self._pool.submit(self._sha.update, view) if self._pool and n >= _PARALLEL_THRESHOLD else None
        if fut is None:
            self._sha.update(view)
        pos = 0
        while pos < n:
            take = min(self.chunk_size - self._in_chunk, n - pos)
            self._chunk.update(view[pos:pos + take])
            self._in_chunk += take
            pos += take
            if self._in_chunk == self.chunk_size:
                self._chunks.append(ChunkDigest(self._chunk.hexdigest()))
                self._chunk = blake3()
                self._in_chunk = 0
        if fut is not None:
            fut.result()
        self.size += n

    def finish(self) -> ChunkIndex:
        """Close the last chunk and return the index (its ``blob`` is the sha256 seen)."""
        if self._in_chunk:
            self._chunks.append(ChunkDigest(self._chunk.hexdigest()))
            self._chunk = blake3()
            self._in_chunk = 0
        self.close()
        chunks = tuple(self._chunks)
        return ChunkIndex(
            blob=BlobDigest("sha256:" + self._sha.hexdigest()),
            size=self.size,
            chunk_size=self.chunk_size,
            chunks=chunks,
            root=chunk_root(chunks),
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> BlobHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def index_file(path: Any, chunk_size: int = DEFAULT_CHUNK_SIZE, *, read_size: int = 0) -> ChunkIndex:
    """Hash a whole file (blocking) and return its index."""
    read_size = read_size or max(chunk_size, 4 << 20)
    buf = bytearray(read_size)
    view = memoryview(buf)
    with BlobHasher(chunk_size) as hasher, open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            hasher.update(view[:n])
        return hasher.finish()
