"""The sha256 of a blob assembled out of order, computed in order as the frontier advances.

Chunks arrive in any order; sha256 must see them in blob order. Every call
runs on one private worker thread, so the hash state needs no lock and the
event loop never hashes. A chunk that arrives ahead of the frontier is kept in
memory (up to ``keep_bytes``) or re-read from the partial file once the
frontier reaches it. When the frontier reaches the end, :meth:`finish` checks
the digest and publishes the blob with the verified chunk index, without
reading the file again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from omx.errors import IntegrityError
from omx.storage import BlobInfo, ChunkIndex, PartialBlob

__all__ = ["Sha256Frontier"]

Chunk = bytes | bytearray | memoryview


class Sha256Frontier:
    """Hashes ``part``'s chunks in order; :meth:`offer` each chunk once it is on disk."""

    def __init__(self, part: PartialBlob, *, keep_bytes: int = 64 << 20) -> None:
        self.part = part
        self.next = 0
        self.keep_bytes = keep_bytes
        self._sha = hashlib.sha256()
        self._ahead: dict[int, tuple[Chunk, Callable[[], None] | None]] = {}
        self._ahead_bytes = 0
        self._reread = set(part.held())
        """Chunks to read back from the file when the frontier reaches them: those held when the
        transfer (re)started, and those offered too far ahead to keep in memory. Every other
        chunk's bytes come with its offer, which the frontier waits for."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256-frontier")
        self._jobs: list[Future[None]] = []

    def offer(self, i: int, data: Chunk | None = None, release: Callable[[], None] | None = None) -> None:
        """Chunk ``i`` is written (its bytes in ``data`` if at hand); hash what became contiguous.

        ``release`` is called (on the frontier's thread) once ``data`` is no longer needed,
        so its buffer can be reused.
        """
        self._jobs = [j for j in self._jobs if not j.done() or j.exception() is not None]
        self._jobs.append(self._pool.submit(self._advance, i, data, release))

    def _advance(self, i: int, data: Chunk | None, release: Callable[[], None] | None = None) -> None:
        if data is not None and i > self.next and self._ahead_bytes + len(data) <= self.keep_bytes:
            self._ahead[i] = (data, release)
            self._ahead_bytes += len(data)
        else:
            if data is not None and i == self.next:
                self._sha.update(data)
                self.next += 1
            elif i > self.next:
                self._reread.add(i)
            if release is not None:
                release()
        count = self.part.chunk_count
        while self.next < count:
            ahead = self._ahead.pop(self.next, None)
            if ahead is not None:
                held, done = ahead
                self._ahead_bytes -= len(held)
                self._sha.update(held)
                if done is not None:
                    done()
            elif self.next in self._reread:
                self._sha.update(self.part.read_chunk(self.next))
            else:
                return
            self.next += 1

    def _finish(self, index: ChunkIndex) -> BlobInfo:
        self._advance(-1, None)
        if self.next != self.part.chunk_count:
            raise IntegrityError(f"blob {self.part.digest} is incomplete ({self.next}/{self.part.chunk_count})")
        got = "sha256:" + self._sha.hexdigest()
        if got != self.part.digest:
            self.part.abort()
            raise IntegrityError(f"digest mismatch, expected {self.part.digest}, got {got}")
        return self.part.finish_with_index(index)

    async def finish(self, index: ChunkIndex) -> BlobInfo:
        """Check the whole blob's sha256 and publish it (the partial data is dropped on a mismatch)."""
        for job in self._jobs:
            exc = job.exception() if job.done() else None
            if exc is not None:
                raise exc
        return await asyncio.wrap_future(self._pool.submit(self._finish, index))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
