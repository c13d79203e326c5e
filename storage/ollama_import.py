"""Bringing the models of an Ollama store into the omx store.

An Ollama store has the layout omx uses (``manifests/<host>/<namespace>/<model>/<tag>``
and ``blobs/sha256-<hex>``), so its models can either be read in place (the
store registered as a read-only extra root) or migrated. Migration links each
blob into the omx store when both sit on one filesystem (a hard link: no
bytes copied) and copies it otherwise; either way the file that becomes
visible in omx was hashed first and matched its digest, and its chunk index
is written under omx's ``chunks/`` folder, never beside Ollama's blobs.

Nothing here writes to an Ollama store, with one exception that callers must
ask for explicitly: :func:`remove_models`, used by ``import-ollama --mode
replace`` without ``--preserve-models``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omx.errors import IntegrityError, NotFound, StoreError
from omx.fsutil import atomic_write, fsync_dir, publish, temp_path
from omx.types import BlobDigest

from ._lock import store_lock
from .blobs import BlobStore
from .chunks import BlobHasher, ChunkIndex, index_file
from .health import store_tmp
from .manifests import manifest_digest
from .names import ModelName, blob_filename
from .ollama_scan import (
    OllamaModel,
    OllamaStore,
    candidate_stores,
    find_stores,
    is_ollama_store,
    scan_store,
)

__all__ = [
    "BlobAction",
    "BlobOutcome",
    "MigrationReport",
    "ModelOutcome",
    "OllamaModel",
    "OllamaStore",
    "backup_store",
    "candidate_stores",
    "find_stores",
    "import_blob",
    "is_ollama_store",
    "migrate",
    "migrate_async",
    "remove_models",
    "scan_store",
]

_READ = 4 << 20
# Errors of os.link that mean "not here", as opposed to a real I/O failure.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}

BlobAction = Literal["linked", "copied", "present"]



@dataclass(frozen=True)
class BlobOutcome:
    """How one blob reached the omx store."""

    digest: BlobDigest
    size: int
    action: BlobAction
    index: ChunkIndex | None = None


@dataclass(frozen=True)
class ModelOutcome:
    """What happened to one model. ``status`` is one of:

    ``imported`` (manifest written), ``present`` (omx already had the same
    manifest), ``conflict`` (omx has a different model under that name; left
    alone), ``failed`` (a blob was missing or corrupt; nothing of it kept).
    """

    name: ModelName
    status: Literal["imported", "present", "conflict", "failed"]
    blobs: tuple[BlobOutcome, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("imported", "present")


@dataclass(frozen=True)
class MigrationReport:
    """The outcome of :func:`migrate` for every model of one Ollama store."""

    source: Path
    target: Path
    models: tuple[ModelOutcome, ...] = field(default=())

    def count(self, action: BlobAction) -> int:
        return sum(1 for m in self.models for b in m.blobs if b.action == action)

    def bytes(self, action: BlobAction) -> int:
        return sum(b.size for m in self.models for b in m.blobs if b.action == action)

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models)


def import_blob(
    blobs: BlobStore, source: Path, digest: BlobDigest, size: int, *, link: bool = True
) -> BlobOutcome:
    """Bring the Ollama blob file ``source`` into ``blobs`` (blocking; hashes the whole file).

    A blob the omx store already holds in its own root is left as it is. Else
    the file is hard-linked (or, across filesystems or when ``link`` is False,
    copied) to a temp name in the omx store, that temp file is hashed, and only
    when its sha256 is ``digest`` are its chunk index and then the blob
    published. The source is opened read-only and never changed.
    Raises :class:`IntegrityError` (corrupt or resized) or :class:`NotFound`.
    """
    if blobs.is_own(digest):
        return BlobOutcome(digest, size, "present", blobs.stored_index(digest))
    try:
        actual = source.stat().st_size
    except FileNotFoundError as e:
        raise NotFound(f"blob {digest} is missing from the Ollama store ({source})") from e
    if actual != size:
        raise IntegrityError(f"blob {digest} in the Ollama store is {actual} bytes, its manifest says {size}")
    tmp = temp_path(store_tmp(blobs.root), "import")
    try:
        action: BlobAction = "copied"
        if link and _try_link(source, tmp):
            action = "linked"
            # Hash the linked inode itself, so what is checked is what is published.
            idx = index_file(tmp, blobs.chunk_size)
        else:
            idx = _copy_hashing(source, tmp, blobs.chunk_size)
        if idx.blob != digest:
            raise IntegrityError(f"blob {digest} in the Ollama store is corrupt: its content hashes to {idx.blob}")
        if idx.size != size:
            raise IntegrityError(f"blob {digest} changed size while it was read")
        # Index first: a blob of the writable root is never visible without one.
        blobs.put_index(idx)
        publish(tmp, blobs.own_path(digest))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BlobOutcome(digest, size, action, idx)


def _try_link(source: Path, dest: Path) -> bool:
    try:
        os.link(source, dest, follow_symlinks=True)
    except OSError as e:
        if e.errno in _NO_LINK:
            return False
        raise
    return True


def _copy_hashing(source: Path, dest: Path, chunk_size: int) -> ChunkIndex:
    buf = bytearray(max(_READ, chunk_size))
    view = memoryview(buf)
    with BlobHasher(chunk_size) as hasher, open(source, "rb", buffering=0) as src, open(dest, "wb") as out:
        while n := src.readinto(buf):
            hasher.update(view[:n])
            out.write(view[:n])
        out.flush()
        os.fsync(out.fileno())
        return hasher.finish()


def migrate(
    store: OllamaStore,
    blobs: BlobStore,
    *,
    names: Iterable[str] | None = None,
    link: bool = True,
    on_blob: Callable[[ModelName, BlobOutcome], None] | None = None,
) -> MigrationReport:
    """Import the models of ``store`` (all, or those in ``names``) into the omx store of ``blobs``.

    Blocking: run it in a thread (see :func:`migrate_async`). Each model is
    imported under the omx store lock: its blobs (see :func:`import_blob`),
    then its manifest, written atomically with the very bytes Ollama wrote so
    the model keeps its digest. A model with a missing or corrupt blob is
    reported as ``failed`` and the blobs this call added for it are removed
    again; other models go on. An existing omx model of the same name is never
    overwritten.
    """
    chosen = store.models if names is None else tuple(store.model(n) for n in names)
    outcomes = [_migrate_one(store.path, m, blobs, link, on_blob) for m in chosen]
    return MigrationReport(store.path, blobs.root, tuple(outcomes))


async def migrate_async(
    store: OllamaStore,
    blobs: BlobStore,
    *,
    names: Sequence[str] | None = None,
    link: bool = True,
    on_blob: Callable[[ModelName, BlobOutcome], None] | None = None,
) -> MigrationReport:
    """:func:`migrate` in a worker thread (hashing never runs on the event loop)."""
    return await asyncio.to_thread(migrate, store, blobs, names=names, link=link, on_blob=on_blob)


def _migrate_one(
    source: Path,
    model: OllamaModel,
    blobs: BlobStore,
    link: bool,
    on_blob: Callable[[ModelName, BlobOutcome], None] | None,
) -> ModelOutcome:
    data = model.manifest_path.read_bytes()
    if manifest_digest(data) != model.digest:
        return ModelOutcome(model.name, "failed", error="its manifest changed while it was being imported")
    with store_lock(blobs.root):
        dest = _own_manifest_path(blobs.root, model.name)
        existing = _read_or_none(dest)
        if existing is not None:
            status: Literal["present", "conflict"] = "present" if existing == data else "conflict"
            if status == "conflict":
                return ModelOutcome(model.name, status,
                                    error="the omx store holds a different model under this name")
            if all(blobs.is_own(d) for d in model.manifest.blobs):
                return ModelOutcome(model.name, status)
        done: list[BlobOutcome] = []
        try:
            sizes = {layer.digest: layer.size for layer in (model.manifest.config, *model.manifest.layers)}
            for digest, size in sizes.items():
                outcome = import_blob(blobs, source / "blobs" / blob_filename(digest), digest, size, link=link)
                done.append(outcome)
                if on_blob is not None:
                    on_blob(model.name, outcome)
        except (IntegrityError, NotFound, OSError) as e:
            for b in done:
                if b.action != "present":
                    blobs.delete(b.digest)
            return ModelOutcome(model.name, "failed", tuple(done), error=str(e))
        if existing is None:
            atomic_write(dest, data, tmp_dir=store_tmp(blobs.root))
        return ModelOutcome(model.name, "imported" if existing is None else "present", tuple(done))


def _own_manifest_path(root: Path, name: ModelName) -> Path:
    """Where ``name``'s manifest is in the omx store: names match case-insensitively, as in Ollama."""
    exact = name.manifest_path(root)
    if exact.is_file():
        return exact
    base = root / "manifests"
    for path in base.glob("*/*/*/*"):
        parts = path.relative_to(base).parts
        if path.is_file() and tuple(p.lower() for p in parts) == name.key:
            return path
    return exact


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------ replace mode


def backup_store(source: Path, dest: Path) -> Path:
    """Copy the whole Ollama store at ``source`` to the new folder ``dest`` (bytes, not links).

    The copy is made under a temp name beside ``dest`` and renamed when complete,
    so ``dest`` never holds half a backup. Raises :class:`StoreError` if
    ``dest`` exists.
    """
    if dest.exists():
        raise StoreError(f"backup folder {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(source, partial, symlinks=True)
        os.replace(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest


def remove_models(store: OllamaStore, report: MigrationReport, blobs: BlobStore) -> list[Path]:
    """Delete from the Ollama store the models ``report`` shows safely held by omx. Returns what went.

    This is the only function that writes to an Ollama store. A model goes
    only when omx holds its exact manifest and every blob in its own root with
    the right size; a blob goes only when no manifest left in the Ollama store
    still references it.
    """
    done = {m.name.key for m in report.models if m.ok}
    removed: list[Path] = []
    for model in store.models:
        if model.name.key not in done or not _held_by_omx(model, blobs):
            continue
        model.manifest_path.unlink(missing_ok=True)
        removed.append(model.manifest_path)
        _prune_empty_dirs(model.manifest_path.parent, store.path / "manifests")
    still_used = {d for m in scan_store(store.path).models for d in m.manifest.blobs}
    gone = {d for m in store.models if m.name.key in done for d in m.manifest.blobs} - still_used
    for digest in sorted(gone):
        p = store.path / "blobs" / blob_filename(digest)
        if p.exists():
            p.unlink()
            removed.append(p)
    return removed


def _held_by_omx(model: OllamaModel, blobs: BlobStore) -> bool:
    own = _read_or_none(_own_manifest_path(blobs.root, model.name))
    if own is None or manifest_digest(own) != model.digest:
        return False
    for layer in (model.manifest.config, *model.manifest.layers):
        p = blobs.own_path(layer.digest)
        if not p.is_file() or p.stat().st_size != layer.size:
            return False
    return True


def _prune_empty_dirs(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
