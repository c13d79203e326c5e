"""Verifying blobs served in place from read-only extra stores (coexist).

A blob of the writable root is verified as it is written. A blob of an extra
root (an Ollama store read in place) was written by another program, so it is
hashed once before its first use: its sha256 must match its name. The outcome
is remembered in ``<root>/verified/sha256-<hex>.json``, keyed by the file's
path, inode, size and modification time, so a restart does not hash it again
while a file that changed is hashed afresh. A blob that does not match is
refused with :class:`~omx.errors.IntegrityError`, as long as it stays that way.

Hashing is blocking; callers run it in a worker thread (the store's async
methods do). Concurrent callers for one blob wait for a single hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from omx.errors import IntegrityError
from omx.fsutil import atomic_write
from omx.types import BlobDigest

from .health import store_tmp
from .names import blob_filename, parse_digest

__all__ = ["BlobVerifier", "Verdict"]

_READ = 4 << 20
_FOLDER = "verified"


@dataclass(frozen=True)
class Verdict:
    """What hashing one extra-root blob file found."""

    path: str
    inode: int
    size: int
    mtime_ns: int
    actual: str
    """``sha256:<hex>`` of the content."""

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.path, self.inode, self.size, self.mtime_ns)


def _file_key(path: Path) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
    return "sha256:" + h.hexdigest()


class BlobVerifier:
    """Hash-once verification of read-only blobs, remembered under ``root/verified/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / _FOLDER
        self._known: dict[BlobDigest, Verdict] = {}
        self._locks: dict[BlobDigest, threading.Lock] = {}
        self._guard = threading.Lock()
        self.hashed = 0
        """How many files this verifier has hashed (a remembered verdict costs none)."""

    def _record_path(self, digest: BlobDigest) -> Path:
        return self.folder / (blob_filename(digest) + ".json")

    def _load(self, digest: BlobDigest) -> Verdict | None:
        try:
            doc = json.loads(self._record_path(digest).read_bytes())
            return Verdict(str(doc["path"]), int(doc["inode"]), int(doc["size"]), int(doc["mtime_ns"]),
                           str(doc["actual"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remembered(self, digest: BlobDigest, key: tuple[str, int, int, int]) -> Verdict | None:
        with self._guard:
            known = self._known.get(digest)
        if known is not None and known.key == key:
            return known
        stored = self._load(digest)
        if stored is not None and stored.key == key:
            with self._guard:
                self._known[digest] = stored
            return stored
        return None

    def verdict(self, digest: BlobDigest, path: Path) -> Verdict:
        """The verdict for ``path`` as it is now: remembered, or found by hashing it (blocking)."""
        digest = parse_digest(digest)
        key = _file_key(path)
        found = self._remembered(digest, key)
        if found is not None:
            return found
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            found = self._remembered(digest, key)  # another caller may have hashed it meanwhile
            if found is not None:
                return found
            actual = _sha256(path)
            with self._guard:
                self.hashed += 1
            after = _file_key(path)
            verdict = Verdict(*after, actual=actual)
            if after == key:  # a file that changed while being read is hashed again next time
                atomic_write(self._record_path(digest), json.dumps(asdict(verdict)), tmp_dir=store_tmp(self.root))
                with self._guard:
                    self._known[digest] = verdict
            return verdict

    def known_good(self, digest: BlobDigest, path: Path) -> bool:
        """True when ``path`` is, unchanged, the file this verifier last found matching (a ``stat``)."""
        with self._guard:
            known = self._known.get(digest)
        if known is None or known.actual != digest:
            return False
        try:
            return _file_key(path) == known.key
        except OSError:
            return False

    def verify(self, digest: BlobDigest, path: Path) -> None:
        """Return when ``path`` holds what ``digest`` names; raise :class:`IntegrityError` otherwise."""
        digest = parse_digest(digest)
        verdict = self.verdict(digest, path)
        if verdict.actual != digest:
            raise IntegrityError(
                f"blob {digest} in the read-only store {path.parent.parent} is corrupt: its content hashes "
                f"to {verdict.actual}; repair that store (e.g. pull the model again with Ollama) or remove "
                "it from models.extra_stores")
