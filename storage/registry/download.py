"""Downloading one blob: chunk-aligned ranged parts fetched in parallel, resumable.

The blob is assembled in a :class:`~omx.storage.partial.PartialBlob` (a file
sized to the blob plus a bitmap of the chunks it holds), so an interrupted
download resumes from what is on disk and never fetches those bytes again.
Missing chunks are grouped into parts (runs of consecutive chunks) that up to
``concurrency`` workers fetch with HTTP ``Range``; each chunk is written as
soon as its bytes arrive. A :class:`FrontierHasher` feeds the chunks to one
:class:`~omx.storage.chunks.BlobHasher` in blob order as the frontier of
contiguous chunks advances, so the sha256 and the chunk index are computed in
one sequential pass while the parts complete. The blob becomes visible only
once its sha256 matches; a mismatch discards the partial data.

Transports signal network failures with :class:`OSError` (e.g.
``ConnectionError``) or :class:`TimeoutError`; those, a stalled body, a
truncated body and ``5xx``/``429`` answers are retried with exponential
backoff. A part that made progress starts its retry count afresh.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from omx.errors import IntegrityError, NotFound, RegistryError
from omx.types import BlobDigest

from ..blobs import BlobInfo, BlobStore
from ..chunks import BlobHasher
from ..partial import PartialBlob
from ..space import disk_error, is_disk_full, require_room
from ._io import discard, error_detail, header, read_body
from .auth import Authenticator

__all__ = ["BlobDownload", "DownloadSettings", "FrontierHasher", "Part", "TransientError", "plan_parts"]


class TransientError(RegistryError):
    """A failure worth retrying (dropped connection, stall, 5xx)."""


@dataclass(frozen=True)
class Part:
    """Chunks ``[first, end)`` of a blob, fetched with one ranged request (re-issued on retry)."""

    first: int
    end: int


def plan_parts(missing: list[int], concurrency: int) -> list[Part]:
    """Group the missing chunks (ascending) into parts of consecutive chunks.

    Parts never straddle a held chunk, and are sized so that the missing
    chunks split into about ``concurrency`` parts.
    """
    if not missing:
        return []
    per_part = max(1, -(-len(missing) // max(1, concurrency)))
    parts: list[Part] = []
    first = prev = missing[0]
    for i in missing[1:]:
        if i != prev + 1 or i - first >= per_part:
            parts.append(Part(first, prev + 1))
            first = i
        prev = i
    parts.append(Part(first, prev + 1))
    return parts


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = 3
    stall_timeout: float = 30.0
    request_timeout: float = 30.0
    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0


class FrontierHasher:
    """Hashes a partial blob's chunks in order as they become available. Thread-safe."""

    def __init__(self, part: PartialBlob) -> None:
        self.part = part
        self.next = 0
        self._hasher = BlobHasher(part.chunk_size)
        self._lock = threading.Lock()

    def offer(self, i: int, data: bytes | None = None) -> None:
        """Chunk ``i`` is on disk; hash it (from ``data`` when given) and any held chunks after it."""
        with self._lock:
            if i == self.next and data is not None:
                self._hasher.update(data)
                self.next += 1
            while self.next < self.part.chunk_count and self.part.has_chunk(self.next):
                self._hasher.update(self.part.read_chunk(self.next))
                self.next += 1

    def finish(self) -> BlobInfo:
        """Check the sha256 and publish the blob; a mismatch aborts the partial blob."""
        with self._lock:
            if self.next != self.part.chunk_count:
                self._hasher.close()
                raise IntegrityError(f"blob {self.part.digest} is incomplete")
            idx = self._hasher.finish()
        if idx.blob != self.part.digest or idx.size != self.part.size:
            self.part.abort()
            raise IntegrityError(
                f"digest mismatch, file must be downloaded again: want {self.part.digest}, got {idx.blob}"
            )
        return self.part.finish_with_index(idx)

    def close(self) -> None:
        self._hasher.close()


class BlobDownload:
    """Fetches one blob into ``blobs``; ``completed`` counts the bytes held so far.

    ``on_bytes`` is told the size of every chunk received from the registry (metrics).
    """

    def __init__(
        self,
        auth: Authenticator,
        url: str,
        scope: str,
        blobs: BlobStore,
        digest: BlobDigest,
        size: int,
        settings: DownloadSettings,
        *,
        on_progress: Callable[[], None] = lambda: None,
        on_bytes: Callable[[int], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.auth = auth
        self.url = url
        self.scope = scope
        self.blobs = blobs
        self.digest = digest
        self.size = size
        self.settings = settings
        self.completed = 0
        self._on_progress = on_progress
        self._on_bytes = on_bytes
        self._sleep = sleep

    async def run(self) -> BlobInfo:
        """Fetch what the partial blob lacks; a full disk is a :class:`StoreError` that says so, at once."""
        try:
            return await self._run()
        except OSError as e:
            if is_disk_full(e):
                raise disk_error(e, f"blob {self.digest}", self.blobs.root) from e
            raise

    async def _run(self) -> BlobInfo:
        part = await asyncio.to_thread(PartialBlob.open, self.blobs, self.digest, self.size)
        hasher = FrontierHasher(part)
        try:
            await asyncio.to_thread(hasher.offer, 0)
            held = part.held()
            self.completed = sum(part.chunk_range(i)[1] for i in held)
            require_room(self.blobs.root, self.size - self.completed, f"blob {self.digest}")
            self._on_progress()
            queue = deque(plan_parts(part.missing(), self.settings.concurrency))
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.settings.concurrency, len(queue))):
                    tg.create_task(self._worker(part, hasher, queue))
            return await asyncio.to_thread(hasher.finish)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            hasher.close()

    async def _worker(self, part: PartialBlob, hasher: FrontierHasher, queue: deque[Part]) -> None:
        while queue:
            await self._fetch_part(part, hasher, queue.popleft())

    async def _fetch_part(self, part: PartialBlob, hasher: FrontierHasher, p: Part) -> None:
        cursor, failures = [p.first], 0
        while cursor[0] < p.end:
            before = cursor[0]
            try:
                await self._fetch_range(part, hasher, cursor, p.end)
                if cursor[0] < p.end:
                    raise TransientError(f"the registry closed the download of {self.digest} early")
            except (OSError, TimeoutError, TransientError) as e:
                if isinstance(e, OSError) and is_disk_full(e):  # no retry helps; the chunks written stay
                    raise disk_error(e, f"blob {self.digest}", self.blobs.root) from e
                failures = 0 if cursor[0] > before else failures + 1
                if failures > self.settings.max_retries:
                    raise RegistryError(f"download of {self.digest} failed after retries: {e}") from e
                delay = min(self.settings.max_backoff, self.settings.backoff * 2 ** max(0, failures - 1))
                await self._sleep(delay * (0.5 + random.random() / 2))

    async def _fetch_range(self, part: PartialBlob, hasher: FrontierHasher, cursor: list[int], end: int) -> None:
        """Fetch chunks ``[cursor[0], end)``, advancing ``cursor[0]`` past each chunk written."""
        first = cursor[0]
        start = part.chunk_range(first)[0]
        stop = part.chunk_range(end - 1)[0] + part.chunk_range(end - 1)[1]
        response = await self.auth.request(
            "GET", self.url, scope=self.scope, headers={"Range": f"bytes={start}-{stop - 1}"},
            request_timeout=self.settings.request_timeout,
        )
        skip = 0
        if response.status == 200:
            skip = start  # the server ignored Range: skip what precedes our part
        elif response.status != 206:
            detail = error_detail(await read_body(response, limit=1 << 16))
            if response.status == 404:
                raise NotFound(f"blob {self.digest} not found on the registry")
            if response.status >= 500 or response.status == 429:
                raise TransientError(f"registry answered {response.status} for {self.digest}: {detail}")
            raise RegistryError(f"registry answered {response.status} for {self.digest}: {detail}")
        else:
            content_range = header(response, "content-range")
            if content_range and not content_range.startswith(f"bytes {start}-"):
                await discard(response)
                raise TransientError(f"registry sent range {content_range!r}, asked for bytes {start}-")
        nxt = first
        buf = bytearray()
        body = response.body.__aiter__()
        try:
            while nxt < end:
                try:
                    piece = await asyncio.wait_for(body.__anext__(), self.settings.stall_timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError as e:
                    raise TransientError(f"download of {self.digest} stalled") from e
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                buf += piece
                while nxt < end and len(buf) >= part.chunk_range(nxt)[1]:
                    length = part.chunk_range(nxt)[1]
                    data = bytes(buf[:length])
                    del buf[:length]
                    await asyncio.to_thread(self._store_chunk, part, hasher, nxt, data)
                    nxt += 1
                    cursor[0] = nxt
                    self.completed += length
                    if self._on_bytes is not None:
                        self._on_bytes(length)
                    self._on_progress()
        finally:
            await discard(response)

    @staticmethod
    def _store_chunk(part: PartialBlob, hasher: FrontierHasher, i: int, data: bytes) -> None:
        part.write_chunk(i, data)
        hasher.offer(i, data)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure of a task group (the others are usually its cancellations)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
