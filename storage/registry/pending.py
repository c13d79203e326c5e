"""The local side of a pull or push: manifests in Ollama's layout, and pulls under way.

A pull records its manifest under ``<root>/pulls/`` before fetching blobs and
removes the record once the model's manifest is written, so a model that is
partly downloaded (a pull running, or interrupted) can be listed as such and
its size known, even after a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omx.errors import ModelNotFound, OmxError
from omx.fsutil import atomic_write, fsync_dir
from omx.types import BlobDigest

from .._lock import store_lock
from ..blobs import BlobStore
from ..health import store_tmp
from ..manifests import Manifest
from ..names import ModelName, blob_filename

__all__ = ["FileManifests", "ManifestAccess", "PendingPull", "PendingPulls"]


class ManifestAccess(Protocol):
    """Reading and writing a model's manifest bytes (blocking calls)."""

    def read_manifest(self, name: ModelName) -> bytes:
        """The manifest's exact bytes; raises :class:`ModelNotFound`."""
        ...

    def write_manifest(self, name: ModelName, data: bytes) -> None:
        """Atomically publish ``data`` as the manifest of ``name``."""
        ...


class FileManifests:
    """Manifests under ``<root>/manifests`` (written) and the extra roots (read only)."""

    def __init__(self, root: Path, extra_roots: Sequence[Path] = ()) -> None:
        self.root = Path(root)
        self.extra_roots = tuple(Path(r) for r in extra_roots)

    def read_manifest(self, name: ModelName) -> bytes:
        for root in (self.root, *self.extra_roots):
            path = _find_casefold(root, name)
            if path is not None:
                return path.read_bytes()
        raise ModelNotFound(name.display)

    def write_manifest(self, name: ModelName, data: bytes) -> None:
        Manifest.from_bytes(data)  # never publish something unreadable
        with store_lock(self.root):
            existing = _find_casefold(self.root, name)
            dest = existing if existing is not None else name.manifest_path(self.root)
            atomic_write(dest, data, tmp_dir=store_tmp(self.root))


def _find_casefold(root: Path, name: ModelName) -> Path | None:
    """The manifest file of ``name`` under ``root``, matching each part case-insensitively."""
    exact = name.manifest_path(root)
    if exact.is_file():
        return exact
    folder = root / "manifests"
    for part in name.parts:
        if not folder.is_dir():
            return None
        match = next((p for p in folder.iterdir() if p.name.lower() == part.lower()), None)
        if match is None:
            return None
        folder = match
    return folder if folder.is_file() else None


@dataclass(frozen=True)
class PendingPull:
    """A model being pulled here: its manifest and how many of its bytes are on disk."""

    name: ModelName
    manifest: Manifest
    completed: int

    @property
    def total(self) -> int:
        return self.manifest.total_size


class PendingPulls:
    """Records of pulls under way in ``<root>/pulls/`` (blocking calls)."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / "pulls"
        self.root = Path(root)

    def _path(self, name: ModelName) -> Path:
        key = "/".join(name.key)
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def record(self, name: ModelName, manifest: bytes) -> None:
        doc = {"name": name.full, "manifest": json.loads(manifest)}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(name), json.dumps(doc), tmp_dir=store_tmp(self.root))

    def forget(self, name: ModelName) -> None:
        path = self._path(name)
        if path.exists():
            path.unlink()
            fsync_dir(self.folder)

    def list(self, blobs: BlobStore) -> list[PendingPull]:
        """Every recorded pull, with the bytes already held (complete blobs and partial chunks)."""
        out: list[PendingPull] = []
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
                name = ModelName.parse(doc["name"])
                manifest = Manifest.from_bytes(json.dumps(doc["manifest"]).encode())
            except (OSError, ValueError, KeyError, TypeError, OmxError):
                continue  # a damaged record is skipped, never fatal to a listing
            out.append(PendingPull(name, manifest, _held_bytes(blobs, manifest)))
        return out


def _held_bytes(blobs: BlobStore, manifest: Manifest) -> int:
    total = 0
    for layer in (manifest.config, *manifest.layers):
        if blobs.has(layer.digest):
            total += layer.size
            continue
        state = blobs.root / "partial" / (blob_filename(layer.digest) + ".state.json")
        if state.is_file():
            total += _partial_bytes(blobs, layer.digest, layer.size)
    return total


def _partial_bytes(blobs: BlobStore, digest: BlobDigest, size: int) -> int:
    """Bytes claimed by a partial blob's bitmap (PartialBlob's state file), read without opening it."""
    try:
        doc = json.loads((blobs.root / "partial" / (blob_filename(digest) + ".state.json")).read_bytes())
        have = base64.b64decode(doc["have"])
        chunk = int(doc["chunk_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    count = -(-size // chunk) if chunk > 0 else 0
    held = 0
    for i in range(count):
        if i >> 3 < len(have) and have[i >> 3] & (1 << (i & 7)):
            held += min(chunk, size - i * chunk)
    return held
