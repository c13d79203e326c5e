"""Damage markers: blobs this node must not serve to peers.

Verification (``omx verify``, a replica check, a peer's complaint) marks a
blob whose bytes no longer match its chunk index or sha256; a marked blob is
never served (the peer chunk endpoints answer 404) until a repaired copy
replaces it and the marker is cleared. Markers live outside ``blobs/`` (which
Ollama prunes of unknown files)::

    damaged/sha256-<hex>     JSON: {"digest", "reason", "chunks", "marked_at"}

Writing a marker is atomic; reading one is a single ``stat`` on the serving
path, so it can be checked for every chunk request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omx.errors import InvalidDigest
from omx.fsutil import atomic_write
from omx.types import BlobDigest

from .blobs import BlobStore
from .health import store_tmp
from .names import blob_filename, parse_digest

__all__ = ["Damage", "clear_damaged", "damaged_blobs", "is_damaged", "mark_damaged", "read_damage"]

_FOLDER = "damaged"


@dataclass(frozen=True)
class Damage:
    """Why a blob is marked: a free-text reason and the chunk numbers found bad (if known)."""

    digest: BlobDigest
    reason: str
    chunks: tuple[int, ...]
    marked_at: float


def _path(blobs: BlobStore, digest: BlobDigest) -> Path:
    return blobs.root / _FOLDER / blob_filename(digest)


def mark_damaged(blobs: BlobStore, digest: BlobDigest, reason: str, chunks: Iterable[int] = ()) -> None:
    """Mark ``digest`` as damaged here (atomic; replaces an earlier marker). Blocking."""
    digest = parse_digest(digest)
    doc = {"digest": digest, "reason": reason, "chunks": sorted(set(chunks)), "marked_at": time.time()}
    atomic_write(_path(blobs, digest), json.dumps(doc), tmp_dir=store_tmp(blobs.root))


def clear_damaged(blobs: BlobStore, digest: BlobDigest) -> bool:
    """Remove the marker (after a repair published a good copy); True when there was one."""
    try:
        _path(blobs, parse_digest(digest)).unlink()
    except FileNotFoundError:
        return False
    return True


def is_damaged(blobs: BlobStore, digest: BlobDigest) -> bool:
    """Whether ``digest`` carries a damage marker (one ``stat``)."""
    return _path(blobs, parse_digest(digest)).is_file()


def read_damage(blobs: BlobStore, digest: BlobDigest) -> Damage | None:
    """The marker of ``digest``, or None. An unreadable marker still counts as damage."""
    path = _path(blobs, parse_digest(digest))
    try:
        doc = json.loads(path.read_bytes())
        return Damage(parse_digest(doc["digest"]), str(doc["reason"]),
                      tuple(int(c) for c in doc.get("chunks", ())), float(doc["marked_at"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, InvalidDigest):
        return Damage(parse_digest(digest), "unreadable damage marker", (), path.stat().st_mtime)


def damaged_blobs(blobs: BlobStore) -> list[BlobDigest]:
    """Every digest marked damaged under this store's writable root."""
    folder = blobs.root / _FOLDER
    found = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        try:
            found.append(parse_digest(p.name))
        except InvalidDigest:
            continue
    return found
