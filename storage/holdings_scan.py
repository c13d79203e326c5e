"""Build a node's :class:`~omx.storage.holdings.Holdings` from its store (blocking; run it in a thread).

The scan reads every manifest (a model counts only when each blob it names is
present), lists the complete blobs of every root with the root of their chunk index
when one is stored (it never hashes: a blob without an index, from a read-only root
or written by Ollama, shows ``root=None`` until its index is built), reads the
partial-blob state files (never opening a partial blob, which would change it),
takes origins, times, factors and transfers from the :class:`MetaState`, and the
free space of the store's filesystem. Blobs marked damaged are left out, and so are
the models that need them: a damaged copy is neither a holder nor a source.

:class:`HoldingsScanner` keeps the chunk-index roots it read, keyed by the index
file's identity, so a rescan after a small change reads only what changed, and
offers :meth:`HoldingsScanner.signature`, a cheap stat walk that changes whenever
a rescan could give a different answer (manifests, blobs, indexes, partial state,
damage markers and the metadata file).
"""

from __future__ import annotations

import hashlib
import os
import shutil

from omx.errors import IntegrityError, InvalidDigest
from omx.types import BlobDigest

from .chunks import chunk_root
from .damaged import damaged_blobs
from .holdings import BlobHolding, BlobRef, HeldModel, Holdings, PartialHolding
from .holdings_meta import META_FILE, MetaState
from .names import parse_digest
from .partial import read_partial_state
from .store import ModelStore

__all__ = ["HoldingsScanner", "read_holdings"]

_STATE_SUFFIX = ".state.json"
_WATCHED = ("manifests", "blobs", "chunks", "partial", "damaged")


class HoldingsScanner:
    """Scans one store into :class:`Holdings`; reuse it so unchanged chunk indexes are not re-read."""

    def __init__(self, store: ModelStore, *, cache_limit: int | None = None) -> None:
        self.store = store
        self.cache_limit = cache_limit
        self._roots: dict[BlobDigest, tuple[tuple[int, int], int, str] | None] = {}

    def signature(self) -> str:
        """A digest of the names, sizes and times of every file a scan reads (blocking, stats only)."""
        h = hashlib.sha256()
        for root in (self.store.root, *self.store.extra_roots):
            for sub in _WATCHED:
                for dirpath, dirnames, filenames in os.walk(root / sub):
                    dirnames.sort()
                    for name in sorted(filenames):
                        _stat_into(h, os.path.join(dirpath, name))
        _stat_into(h, str(self.store.root / META_FILE))
        return h.hexdigest()

    def scan(self, meta: MetaState) -> Holdings:
        """This node's holdings now (blocking)."""
        store = self.store
        damaged = set(damaged_blobs(store.blobs))
        blobs: dict[BlobDigest, BlobHolding] = {}
        for digest in store.blobs.digests(include_extra=True):
            if digest in damaged:
                continue
            found = self._blob(digest)
            if found is not None:
                blobs[digest] = found
        models = []
        for name, path, writable in store._manifests():
            try:
                manifest, digest, _ = store._read_manifest(path)
                mtime = path.stat().st_mtime
            except (IntegrityError, OSError):
                continue
            sizes: dict[BlobDigest, int] = {}
            for layer in (manifest.config, *manifest.layers):
                sizes.setdefault(layer.digest, layer.size)
            if any(d not in blobs or blobs[d].size != s for d, s in sizes.items()):
                continue
            display = name.display
            rec = meta.record_for(display, digest)
            models.append(HeldModel(
                name=display, digest=digest, size=manifest.total_size,
                blobs=tuple(BlobRef(d, s) for d, s in sizes.items()),
                origin=rec.origin if rec else "user", created_at=rec.created_at if rec else mtime,
                last_used=max(rec.last_used, mtime) if rec else mtime, modified_at=mtime,
                read_only=not writable,
            ))
        return Holdings.of(
            models=models, blobs=blobs.values(), partials=self._partials(set(blobs)),
            incoming=meta.incoming.values(), factors=meta.factors.values(),
            free_bytes=shutil.disk_usage(store.root).free, cache_limit=self.cache_limit,
        )

    def _blob(self, digest: BlobDigest) -> BlobHolding | None:
        blobs = self.store.blobs
        try:
            own = blobs.is_own(digest)
            size = blobs.path(digest).stat().st_size
        except (OSError, IntegrityError):
            return None
        chunk_size, root = self._index_root(digest, size)
        return BlobHolding(digest, size, chunk_size, root, read_only=not own)

    def _index_root(self, digest: BlobDigest, size: int) -> tuple[int | None, str | None]:
        path = self.store.blobs.index_path(digest)
        try:
            st = path.stat()
        except OSError:
            return None, None
        ident = (st.st_ino, st.st_mtime_ns)
        cached = self._roots.get(digest)
        if cached is None or cached[0] != ident:
            idx = self.store.blobs.stored_index(digest)
            cached = (ident, idx.chunk_size, idx.root) if idx is not None and idx.size == size else None
            if cached is None:
                self._roots.pop(digest, None)
                return None, None
            self._roots[digest] = cached
        return cached[1], cached[2]

    def _partials(self, complete: set[BlobDigest]) -> list[PartialHolding]:
        folder = self.store.root / "partial"
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(_STATE_SUFFIX))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            try:
                digest = parse_digest(name[: -len(_STATE_SUFFIX)])
            except InvalidDigest:
                continue
            state = read_partial_state(self.store.blobs, digest) if digest not in complete else None
            if state is None or not state.data_path.is_file():
                continue
            root = chunk_root(state.chunks) if state.chunks is not None else None
            found.append(PartialHolding(digest, state.size, state.chunk_size, state.have, root))
        return found


def read_holdings(store: ModelStore, meta: MetaState, *, cache_limit: int | None = None) -> Holdings:
    """One-off scan of ``store`` (see :class:`HoldingsScanner` to rescan cheaply)."""
    return HoldingsScanner(store, cache_limit=cache_limit).scan(meta)


def _stat_into(h: hashlib._Hash, path: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return
    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
