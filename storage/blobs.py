"""The blob store: content-addressed files plus their chunk indexes.

Layout under the writable root (Ollama's, plus two folders Ollama ignores)::

    blobs/sha256-<hex>          the blobs, named by their sha256
    chunks/sha256-<hex>.json    the chunk index of each blob (outside blobs/,
                                which Ollama prunes of unknown files)
    partial/                    partial blobs being fetched (see partial.py)
    tmp/                        temp files, swept by ModelStore.recover at node start

Invariant: a blob in the writable root's ``blobs/`` has a valid index beside
it, because the index is published (atomically) before the blob is renamed
into place. Blobs found elsewhere (extra read-only roots, or written by
Ollama) get their index built on first use and stored under the writable
root. Extra roots are never written to.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from omx.errors import BlobNotFound, IntegrityError, InvalidDigest
from omx.fsutil import atomic_write, publish, temp_path
from omx.types import BlobDigest

from .chunks import DEFAULT_CHUNK_SIZE, BlobHasher, ChunkIndex, index_file
from .health import store_tmp
from .names import blob_filename, parse_digest

__all__ = ["BlobInfo", "BlobStore"]

_FEED = 4 << 20


@dataclass(frozen=True)
class BlobInfo:
    """The outcome of a blob write. ``created`` is False when the blob was already there."""

    digest: BlobDigest
    size: int
    path: Path
    created: bool
    index: ChunkIndex | None = None


class _Sink:
    """A temp file being written and hashed; every method runs in a worker thread."""

    def __init__(self, path: Path, chunk_size: int) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._hasher = BlobHasher(chunk_size)

    def feed(self, data: bytearray) -> None:
        self._file.write(data)
        self._hasher.update(data)

    def finish(self) -> ChunkIndex:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hasher.finish()

    def abort(self) -> None:
        self._file.close()
        self._hasher.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    """Blobs under ``root`` (writable) and ``extra_roots`` (read-only, searched after ``root``)."""

    def __init__(
        self, root: Path, extra_roots: Sequence[Path] = (), *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        self.root = Path(root)
        self.extra_roots = tuple(Path(r) for r in extra_roots)
        self.chunk_size = chunk_size
        for sub in ("blobs", "chunks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ lookup

    def own_path(self, digest: BlobDigest) -> Path:
        """Where ``digest`` lives (or would live) in the writable root."""
        return self.root / "blobs" / blob_filename(digest)

    def index_path(self, digest: BlobDigest) -> Path:
        return self.root / "chunks" / (blob_filename(digest) + ".json")

    def path(self, digest: BlobDigest) -> Path:
        """The file of ``digest``, searching the writable root then the extra roots."""
        name = blob_filename(digest)
        for root in (self.root, *self.extra_roots):
            p = root / "blobs" / name
            if p.is_file():
                return p
        raise BlobNotFound(f"blob {parse_digest(digest)} not found")

    def has(self, digest: BlobDigest) -> bool:
        try:
            self.path(digest)
        except BlobNotFound:
            return False
        return True

    def is_own(self, digest: BlobDigest) -> bool:
        """Whether the blob is in the writable root (and may therefore be deleted)."""
        return self.own_path(digest).is_file()

    def size(self, digest: BlobDigest) -> int:
        return self.path(digest).stat().st_size

    def digests(self, *, include_extra: bool = False) -> list[BlobDigest]:
        """Digests of the blobs present (writable root only unless ``include_extra``)."""
        roots = (self.root, *self.extra_roots) if include_extra else (self.root,)
        found: dict[BlobDigest, None] = {}
        for root in roots:
            for d in _scan_blobs(root / "blobs"):
                found.setdefault(d, None)
        return sorted(found)

    # ------------------------------------------------------------ indexes

    def stored_index(self, digest: BlobDigest) -> ChunkIndex | None:
        """The index on disk for ``digest`` if present and valid, else None (never hashes)."""
        p = self.index_path(digest)
        try:
            idx = ChunkIndex.from_json(p.read_bytes())
        except (FileNotFoundError, IntegrityError):
            return None
        return idx if idx.blob == parse_digest(digest) else None

    def index(self, digest: BlobDigest) -> ChunkIndex:
        """The chunk index of a present blob, built (by hashing the blob) if missing. Blocking.

        Raises :class:`IntegrityError` when hashing shows the blob is not what its name says.
        """
        digest = parse_digest(digest)
        idx = self.stored_index(digest)
        blob = self.path(digest)
        if idx is not None and idx.size == blob.stat().st_size:
            return idx
        idx = index_file(blob, self.chunk_size)
        if idx.blob != digest:
            raise IntegrityError(f"blob {digest} is corrupt: its content hashes to {idx.blob}")
        self.put_index(idx)
        return idx

    def put_index(self, idx: ChunkIndex) -> None:
        """Store an index (atomically). Used before a blob is published, and by replicas."""
        idx.validate()
        atomic_write(self.index_path(idx.blob), idx.to_json(), tmp_dir=store_tmp(self.root))

    # ------------------------------------------------------------ writes

    async def write(
        self, stream: AsyncIterator[bytes], *, expected: BlobDigest | None = None
    ) -> BlobInfo:
        """Store the bytes of ``stream`` as a blob, verified against ``expected`` when given.

        Hashing and disk I/O run in a worker thread, overlapping with reading the
        stream. On a digest mismatch the temp file is removed and
        :class:`InvalidDigest` raised. When the blob already exists the stream is
        drained and nothing is rewritten.
        """
        if expected is not None:
            expected = parse_digest(expected)
            if await asyncio.to_thread(self.has, expected):
                async for _piece in stream:
                    pass
                path = await asyncio.to_thread(self.path, expected)
                return BlobInfo(expected, path.stat().st_size, path, created=False)
        tmp = await asyncio.to_thread(temp_path, store_tmp(self.root), "blob")
        sink = await asyncio.to_thread(_Sink, tmp, self.chunk_size)
        pending: asyncio.Future[None] | None = None
        try:
            buf = bytearray()
            async for piece in stream:
                buf += piece
                if len(buf) >= _FEED:
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(asyncio.to_thread(sink.feed, buf))
                    buf = bytearray()
            if pending is not None:
                await pending
                pending = None
            if buf:
                await asyncio.to_thread(sink.feed, buf)
            idx = await asyncio.to_thread(sink.finish)
        except BaseException as exc:
            if pending is not None and not pending.done():
                if isinstance(exc, asyncio.CancelledError):
                    # The worker still holds the file: clean up once it lets go.
                    pending.add_done_callback(lambda f: _abort_after(f, sink))
                    raise
                await asyncio.wait([pending])
            if pending is not None and pending.done() and not pending.cancelled():
                pending.exception()  # retrieved: the first error is the one raised
            sink.abort()
            raise
        if expected is not None and idx.blob != expected:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise InvalidDigest(f"digest mismatch, expected {expected}, got {idx.blob}")
        return await asyncio.to_thread(self._commit, tmp, idx)

    def _commit(self, tmp: Path, idx: ChunkIndex) -> BlobInfo:
        if self.has(idx.blob):
            tmp.unlink(missing_ok=True)
            path = self.path(idx.blob)
            return BlobInfo(idx.blob, idx.size, path, created=False, index=idx)
        # Index first: a blob must never be visible without one.
        self.put_index(idx)
        dest = self.own_path(idx.blob)
        publish(tmp, dest)
        return BlobInfo(idx.blob, idx.size, dest, created=True, index=idx)

    def write_bytes(self, data: bytes) -> BlobInfo:
        """Store a small in-memory blob (config, template, params…). Blocking."""
        with BlobHasher(self.chunk_size, parallel=False) as h:
            h.update(data)
            idx = h.finish()
        if self.has(idx.blob):
            return BlobInfo(idx.blob, idx.size, self.path(idx.blob), created=False, index=idx)
        tmp = temp_path(store_tmp(self.root), "blob")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._commit(tmp, idx)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def delete(self, digest: BlobDigest) -> bool:
        """Remove a blob of the writable root, then its index. Never touches extra roots."""
        digest = parse_digest(digest)
        removed = False
        try:
            self.own_path(digest).unlink()
            removed = True
        except FileNotFoundError:
            pass
        if not any((r / "blobs" / blob_filename(digest)).is_file() for r in self.extra_roots):
            self.index_path(digest).unlink(missing_ok=True)
        return removed


def _abort_after(fut: asyncio.Future[None], sink: _Sink) -> None:
    if not fut.cancelled():
        fut.exception()
    sink.abort()


def _scan_blobs(folder: Path) -> Iterator[BlobDigest]:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name.startswith("sha256-") and e.is_file():
            try:
                yield parse_digest(e.name)
            except InvalidDigest:
                continue
