"""An offline fsck of a node's model store, for the soak and crash tests.

It runs the store's own deep check (:meth:`ModelStore.check_sync` with ``deep``:
every manifest's blobs present with the right size, every blob's chunk index
valid and matching a re-hash) and adds what a crash could still hide from it:
every blob's sha256 is recomputed and compared with its name, and no manifest
names a blob that exists only as a partial download.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omx.storage import ModelStore

__all__ = ["CRASH_LEFTOVER", "fsck", "store_root"]

CRASH_LEFTOVER = "stale temp file"
"""Problems starting with this are what a ``kill -9`` leaves for the next start's ``recover`` to sweep."""


def store_root(home: Path) -> Path:
    """The writable model store of a node whose ``OMX_HOME`` is ``home``."""
    return home / "data" / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fsck(root: Path, *, chunk_size: int) -> list[str]:
    """Every problem found in the store at ``root`` (empty when healthy). The store must not be written meanwhile."""
    store = ModelStore(root, chunk_size=chunk_size)
    problems = store.check_sync(deep=True)
    for digest in store.blobs.digests():
        path = store.blobs.own_path(digest)
        if _sha256(path) != digest.removeprefix("sha256:"):
            problems.append(f"blob {digest} does not match its sha256")
    partial = root / "partial"
    partial_names = {p.name.removesuffix(".data").removesuffix(".state.json")
                     for p in partial.iterdir()} if partial.is_dir() else set()
    for name, path, _writable in store._manifests():
        manifest, _, _ = store._read_manifest(path)
        for layer in (manifest.config, *manifest.layers):
            if not store.blobs.has(layer.digest) and layer.digest.replace(":", "-") in partial_names:
                problems.append(f"manifest {name.full}: blob {layer.digest} is only partial")
    return problems
