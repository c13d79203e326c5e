"""Store health: the fsck behind ``ModelStore.check`` and the crash clean-up behind ``recover``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omx.errors import IntegrityError
from omx.types import BlobDigest

from .chunks import ChunkIndex, index_file

if TYPE_CHECKING:
    from .store import ModelStore

__all__ = ["TMP_DIR", "check", "recover", "stale_temp_files", "store_tmp"]

TMP_DIR = "tmp"
"""Temp files of store writes live here (same filesystem as the store); ``recover`` sweeps it."""

_STALE_TMP_SECONDS = 24 * 3600
_ORPHAN_GRACE_SECONDS = 600.0


def store_tmp(root: Path) -> Path:
    """The folder for temp files of writes under the store ``root``."""
    return root / TMP_DIR


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(store: ModelStore, *, deep: bool = False) -> list[str]:
    """Problems found (empty when healthy). ``deep`` re-hashes every blob of the writable root."""
    problems: list[str] = []
    for name, path, _w in store._manifests():
        try:
            manifest, _, _ = store._read_manifest(path)
        except (IntegrityError, OSError) as e:
            problems.append(f"manifest {name.full}: {e}")
            continue
        for layer in (manifest.config, *manifest.layers):
            if not store.blobs.has(layer.digest):
                problems.append(f"manifest {name.full}: blob {layer.digest} is missing")
            elif store.blobs.size(layer.digest) != layer.size:
                problems.append(f"manifest {name.full}: blob {layer.digest} has the wrong size")
    for d in store.blobs.digests():
        idx = store.blobs.stored_index(d)
        size = store.blobs.own_path(d).stat().st_size
        if idx is None:
            problems.append(f"blob {d} has no valid chunk index")
        elif idx.size != size:
            problems.append(f"blob {d} is {size} bytes but its index says {idx.size}")
        elif deep and _rehash(store, d) != idx:
            problems.append(f"blob {d} does not match its digest or index")
    for p in sorted((store.root / "blobs").iterdir()):
        if not p.name.startswith("sha256-") or len(p.name) != 71:
            problems.append(f"unexpected file in blobs/: {p.name}")
    for p in stale_temp_files(store):
        problems.append(f"stale temp file {p.name}")
    return problems

def _rehash(store: ModelStore, digest: BlobDigest) -> ChunkIndex | None:
    idx = store.blobs.stored_index(digest)
    return index_file(store.blobs.own_path(digest), idx.chunk_size if idx else store.blobs.chunk_size)

def stale_temp_files(store: ModelStore) -> list[Path]:
    stale = []
    now = time.time()
    folder = store_tmp(store.root)
    for p in folder.iterdir() if folder.is_dir() else ():
        parts = p.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        try:
            old = now - p.stat().st_mtime > _STALE_TMP_SECONDS
        except FileNotFoundError:
            continue
        if old or pid is None or not _pid_alive(pid):
            stale.append(p)
    return stale

def recover(store: ModelStore) -> list[str]:
    """Remove what a crash can leave behind; returns what was done. Safe while others write.

    Temp files of dead processes, indexes of blobs that never became visible,
    and half of a partial blob whose other half is gone.
    """
    done = []
    now = time.time()

    def settled(p: Path) -> bool:
        # A concurrent writer publishes the other half within moments; only
        # leftovers older than the grace period are a crash's doing.
        try:
            return now - p.stat().st_mtime > _ORPHAN_GRACE_SECONDS
        except FileNotFoundError:
            return False

    for p in stale_temp_files(store):
        p.unlink(missing_ok=True)
        done.append(f"removed stale temp file {p.name}")
    for p in sorted((store.root / "chunks").glob("sha256-*.json")):
        blob_name = p.name.removesuffix(".json")
        if settled(p) and not any((r / "blobs" / blob_name).exists() for r in store._roots()):
            # An index is written before its blob; alone, it is a leftover.
            p.unlink(missing_ok=True)
            done.append(f"removed orphan index {p.name}")
    partial = store.root / "partial"
    if partial.is_dir():
        for p in sorted(partial.iterdir()):
            base = p.name.removesuffix(".data").removesuffix(".state.json")
            pair = partial / (base + (".state.json" if p.name.endswith(".data") else ".data"))
            published = p.name.endswith(".state.json") and any((r / "blobs" / base).is_file() for r in store._roots())
            if published or (not pair.exists() and settled(p)):
                # A state whose blob is published is what a writer killed between the rename
                # and its clean-up leaves: a finishing writer renames the data file, so it has none.
                p.unlink(missing_ok=True)
                done.append(f"removed orphan partial file {p.name}")
    return done
