"""Partial blobs: a file being filled chunk by chunk, with a persisted bitmap.

One format serves both the registry pull (ranged downloads that resume) and the
peer swarm (chunks fetched from several peers in any order)::

    partial/sha256-<hex>.data         the blob's bytes, sized to the full blob
    partial/sha256-<hex>.state.json   size, chunk size, bitmap of held chunks,
                                      and the chunk digests when known

Crash safety: a chunk's bytes are fsynced before the bitmap that claims them is
(atomically) rewritten, so the bitmap never claims bytes that are not on disk.
:meth:`PartialBlob.finish` hashes the whole file, checks its sha256 (and the
chunk digests when known), writes the chunk index, then renames the data file
into ``blobs/``; until then nothing is visible.

Usage (blocking calls; run them with ``asyncio.to_thread`` from async code)::

    part = PartialBlob.open(store, digest, size, index=peer_index)  # or chunk_size=
    for i in part.missing():
        part.write_chunk(i, fetch(i))        # verified at once when the index is known
    info = part.finish()                     # verified against sha256, then visible

Several threads may call :meth:`write_chunk` concurrently for distinct chunks.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omx.errors import IntegrityError, InvalidRequest
from omx.fsutil import atomic_write, publish
from omx.types import BlobDigest, ChunkDigest

from .blobs import BlobInfo, BlobStore
from .chunks import ChunkIndex, index_file, verify_chunk
from .damaged import clear_damaged
from .health import store_tmp
from .names import blob_filename, parse_digest

__all__ = ["PartialBlob", "PartialState", "read_partial_state"]


class PartialBlob:
    """A blob being assembled from chunks; create with :meth:`open`."""

    def __init__(
        self, store: BlobStore, digest: BlobDigest, size: int, chunk_size: int,
        chunks: tuple[ChunkDigest, ...] | None, have: bytearray,
    ) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunks
        self._have = have
        self._unsynced: set[int] = set()
        """Chunks written with ``durable=False`` and not yet recorded by :meth:`sync`."""
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        base = store.root / "partial" / blob_filename(digest)
        self.data_path = base.with_name(base.name + ".data")
        self.state_path = base.with_name(base.name + ".state.json")

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, store: BlobStore, digest: BlobDigest, size: int, chunk_size: int | None = None,
        *, index: ChunkIndex | None = None,
    ) -> PartialBlob:
        """Start or resume assembling ``digest`` of ``size`` bytes.

        With ``index`` (e.g. a peer's), its chunk size is used and every chunk is
        verified as it arrives; otherwise chunks of ``chunk_size`` (default: the
        store's) are only checked at :meth:`finish`. A saved state that does not
        match (other size or chunk size) is discarded and assembly restarts.
        """
        digest = parse_digest(digest)
        if size < 0:
            raise InvalidRequest(f"invalid blob size {size}")
        chunks: tuple[ChunkDigest, ...] | None = None
        if index is not None:
            if index.blob != digest or index.size != size:
                raise IntegrityError(f"chunk index does not describe blob {digest} of {size} bytes")
            index.validate()
            chunk_size, chunks = index.chunk_size, index.chunks
        chunk_size = chunk_size or store.chunk_size
        count = -(-size // chunk_size)
        part = cls(store, digest, size, chunk_size, chunks, bytearray(-(-count // 8)))
        part.data_path.parent.mkdir(parents=True, exist_ok=True)
        saved = part._load_state()
        if saved is not None and saved["size"] == size and saved["chunk_size"] == chunk_size:
            have = bytearray(base64.b64decode(saved["have"]))
            if len(have) == len(part._have) and part.data_path.is_file():
                part._have = have
            if part.chunks is None and saved.get("chunks"):
                part.chunks = tuple(ChunkDigest(c) for c in saved["chunks"])
        elif saved is not None:
            part.data_path.unlink(missing_ok=True)
        created = not part.data_path.is_file() or part.data_path.stat().st_size != size
        try:
            if created:
                part._have = bytearray(len(part._have))
                with open(part.data_path, "wb") as f:
                    f.truncate(size)
                    os.fsync(f.fileno())
            part._save_state()
        except OSError:
            if created:  # nothing is held yet: leave no data file without a state (e.g. the disk is full)
                part.abort()
            raise
        return part

    @classmethod
    def adopt(cls, store: BlobStore, path: Path, index: ChunkIndex, *, held: set[int]) -> PartialBlob:
        """Turn the complete file ``path`` of ``index.blob`` into a partial blob holding ``held`` chunks.

        For repairs: the file is renamed (never copied or edited in place) into
        ``partial/``, after a state file that claims only ``held`` is written, so a
        transfer then fetches just the other chunks. A crash between the two steps
        leaves the blob where it was and a state that :meth:`open` discards.
        """
        index.validate()
        part = cls(store, index.blob, index.size, index.chunk_size, index.chunks,
                   bytearray(-(-index.chunk_count // 8)))
        for i in held:
            if 0 <= i < index.chunk_count:
                part._have[i >> 3] |= 1 << (i & 7)
        part.data_path.parent.mkdir(parents=True, exist_ok=True)
        part._save_state()
        os.replace(path, part.data_path)
        return part

    def _load_state(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.state_path.read_bytes())
            if doc.get("digest") != self.digest:
                return None
            return dict(doc)
        except (FileNotFoundError, ValueError):
            return None

    def _save_state(self) -> None:
        doc = {
            "version": 1,
            "digest": self.digest,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "have": base64.b64encode(bytes(self._have)).decode(),
            "chunks": list(self.chunks) if self.chunks is not None else None,
        }
        atomic_write(self.state_path, json.dumps(doc), tmp_dir=store_tmp(self.store.root))

    # ------------------------------------------------------------ chunks

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i``."""
        if not 0 <= i < self.chunk_count:
            raise IndexError(f"chunk {i} out of range (blob has {self.chunk_count})")
        off = i * self.chunk_size
        return off, min(self.chunk_size, self.size - off)

    def has_chunk(self, i: int) -> bool:
        """Whether chunk ``i`` is in the data file (recorded in the bitmap, or written and awaiting :meth:`sync`)."""
        return bool(self._have[i >> 3] & (1 << (i & 7))) or i in self._unsynced

    def missing(self) -> list[int]:
        return [i for i in range(self.chunk_count) if not self.has_chunk(i)]

    def held(self) -> list[int]:
        """Chunks already on disk (a swarm peer may serve these before the blob is complete)."""
        return [i for i in range(self.chunk_count) if self.has_chunk(i)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    def write_chunk(self, i: int, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Write chunk ``i`` (verified first when its digest is known) and record it.

        ``durable=False`` skips the per-chunk fsync and bitmap write: the chunk can be
        read back at once but is recorded on disk only by the next :meth:`sync` (or
        :meth:`finish`), so a crash before that loses it (it is fetched again) and the
        bitmap never claims bytes that are not on disk.
        """
        off, length = self.chunk_range(i)
        if len(data) != length:
            raise IntegrityError(f"chunk {i} of {self.digest} must be {length} bytes, got {len(data)}")
        if self.chunks is not None and not verify_chunk(data, self.chunks[i]):
            raise IntegrityError(f"chunk {i} of {self.digest} does not match its digest {self.chunks[i]}")
        fd = os.open(self.data_path, os.O_WRONLY)
        try:
            view = memoryview(data)
            written = 0
            while written < length:
                written += os.pwrite(fd, view[written:], off + written)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            if durable:
                self._have[i >> 3] |= 1 << (i & 7)
                self._save_state()
            else:
                self._unsynced.add(i)

    def sync(self) -> int:
        """Record the chunks written with ``durable=False``: one fsync of the data file, then one
        bitmap write. Returns how many chunks it recorded. Blocking."""
        with self._sync_lock:
            with self._lock:
                pending = set(self._unsynced)
            if not pending:
                return 0
            fd = os.open(self.data_path, os.O_WRONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                for i in pending:
                    self._have[i >> 3] |= 1 << (i & 7)
                self._unsynced -= pending
                self._save_state()
            return len(pending)

    def read_chunk(self, i: int) -> bytes:
        """Bytes of a held chunk."""
        if not self.has_chunk(i):
            raise IndexError(f"chunk {i} of {self.digest} is not held yet")
        off, length = self.chunk_range(i)
        with open(self.data_path, "rb") as f:
            f.seek(off)
            return f.read(length)

    # ------------------------------------------------------------ end

    def finish(self) -> BlobInfo:
        """Verify the whole blob, store its index, and make it visible. Blocking.

        On a sha256 mismatch the partial state is discarded and
        :class:`IntegrityError` raised.
        """
        missing = self.missing()
        if missing:
            raise IntegrityError(f"blob {self.digest} is missing {len(missing)} chunk(s)")
        self.sync()
        idx = index_file(self.data_path, self.chunk_size)
        if idx.blob != self.digest or (self.chunks is not None and idx.chunks != self.chunks):
            self.abort()
            raise IntegrityError(f"digest mismatch, expected {self.digest}, got {idx.blob}")
        if not self.store.has(self.digest):
            self._publish(idx)
        self.abort()
        return BlobInfo(self.digest, self.size, self.store.path(self.digest), created=True, index=idx)

    def finish_with_index(self, idx: ChunkIndex) -> BlobInfo:
        """Publish a complete blob whose index the caller computed while writing it. Blocking.

        For writers that hash the chunks as they arrive (the registry pull): the
        whole file is not read again. ``idx`` must describe this blob exactly.
        """
        if self.missing():
            raise IntegrityError(f"blob {self.digest} is missing chunks")
        if idx.blob != self.digest or idx.size != self.size or idx.chunk_size != self.chunk_size:
            self.abort()
            raise IntegrityError(f"digest mismatch, expected {self.digest}, got {idx.blob}")
        self.sync()  # chunks written without fsync become durable before the blob is renamed into place
        if not self.store.has(self.digest):
            self._publish(idx)
        self.abort()
        return BlobInfo(self.digest, self.size, self.store.path(self.digest), created=True, index=idx)

    def _publish(self, idx: ChunkIndex) -> None:
        self.store.put_index(idx)
        # A damage marker names the bad copy a repair moved aside; it goes before the good copy
        # takes its place, so a crash in between leaves no good blob marked (never served again).
        clear_damaged(self.store, self.digest)
        publish(self.data_path, self.store.own_path(self.digest))

    def abort(self) -> None:
        """Forget this partial blob (state first, so a crash never leaves a bitmap without data)."""
        self.state_path.unlink(missing_ok=True)
        self.data_path.unlink(missing_ok=True)


def partial_files(store_root: Path) -> list[Path]:
    """Every file under ``partial/`` (used by recovery and fsck)."""
    folder = store_root / "partial"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@dataclass(frozen=True)
class PartialState:
    """A read-only look at a partial blob on disk (what a swarm peer may serve from it)."""

    digest: BlobDigest
    size: int
    chunk_size: int
    have: bytes
    """Bitmap of held chunks: bit ``i & 7`` of byte ``i >> 3`` is chunk ``i``."""
    chunks: tuple[ChunkDigest, ...] | None
    data_path: Path

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def has_chunk(self, i: int) -> bool:
        return 0 <= i < self.chunk_count and bool(self.have[i >> 3] & (1 << (i & 7)))

    def held(self) -> list[int]:
        return [i for i in range(self.chunk_count) if self.has_chunk(i)]


def read_partial_state(store: BlobStore, digest: BlobDigest) -> PartialState | None:
    """The saved state of ``digest``'s partial blob, without opening (or changing) it. Blocking.

    None when there is no partial blob or its state is unreadable or inconsistent.
    """
    digest = parse_digest(digest)
    base = store.root / "partial" / blob_filename(digest)
    try:
        doc = json.loads(base.with_name(base.name + ".state.json").read_bytes())
        if doc.get("digest") != digest:
            return None
        size, chunk_size = int(doc["size"]), int(doc["chunk_size"])
        have = base64.b64decode(doc["have"])
        chunks = tuple(ChunkDigest(str(c)) for c in doc["chunks"]) if doc.get("chunks") else None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    count = -(-size // chunk_size) if chunk_size > 0 else -1
    if size < 0 or count < 0 or len(have) != -(-count // 8) or (chunks is not None and len(chunks) != count):
        return None
    return PartialState(digest, size, chunk_size, have, chunks, base.with_name(base.name + ".data"))
