"""Custom functions at rest: their sources as BLAKE3-addressed blobs and the function table.

Layout under ``$OMX_HOME/functions/``::

    blobs/<blake3 hex>     a deployed source file, named by the BLAKE3 of its bytes
    state.json             the function table (written atomically)

A function's ``version`` is the BLAKE3 hex of its source file. The table holds
one :class:`FunctionRecord` per name ever deployed: its current version, file
name, spec (the authoring layer's ``FunctionSpec.to_json()``, kept as JSON:
storage knows nothing of it), the time it was deployed, the versions before it
(newest first, for rollback) and, once removed, a tombstone (``removed``) so a
removal spreads through the cluster and sticks.

Every change bumps the record's ``generation``; two tables merge record by
record, last writer wins by :meth:`FunctionRecord.order` — ``(generation,
deployed_at, origin)`` — so every node reaches the same table whatever order
the announcements arrive in (:func:`merge` is commutative, associative and
idempotent).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blake3 import blake3

from omx.errors import IntegrityError, StoreError
from omx.fsutil import atomic_write

__all__ = [
    "MAX_PREVIOUS",
    "MAX_SOURCE_BYTES",
    "FunctionRecord",
    "FunctionStore",
    "PastVersion",
    "merge",
    "record_from_json",
    "record_to_json",
    "source_version",
]

MAX_SOURCE_BYTES = 1 << 20
"""The largest source file a node accepts (bytes)."""
MAX_PREVIOUS = 10
"""Older versions kept per function for rollback."""
_VERSION = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_STATE_FORMAT = 1


def source_version(source: bytes) -> str:
    """The version of a source file: the BLAKE3 hex of its bytes."""
    return blake3(source).hexdigest()


@dataclass(frozen=True)
class PastVersion:
    """A version a function had before, kept so it can be rolled back to."""

    version: str
    file: str
    spec: Mapping[str, Any]
    deployed_at: float


@dataclass(frozen=True)
class FunctionRecord:
    """One function of the table (a tombstone when ``removed``)."""

    name: str
    version: str
    file: str
    spec: Mapping[str, Any]
    deployed_at: float
    generation: int
    origin: str
    """The node that made this change (the last tie-breaker of the merge)."""
    previous: tuple[PastVersion, ...] = ()
    removed: bool = False

    def order(self) -> tuple[int, float, str]:
        """What the merge compares: the greater record wins."""
        return (self.generation, self.deployed_at, self.origin)

    @property
    def path(self) -> str:
        return str(self.spec.get("path", ""))

    @property
    def versions(self) -> tuple[str, ...]:
        """Every version this record needs a blob for (current first)."""
        if self.removed:
            return ()
        return (self.version, *(p.version for p in self.previous))

    def deployed(self, *, version: str, file: str, spec: Mapping[str, Any], now: float,
                 origin: str) -> FunctionRecord:
        """This function after a deploy of ``version`` (the current one becomes the latest previous)."""
        previous = self.previous
        if not self.removed and version != self.version:
            previous = (PastVersion(self.version, self.file, self.spec, self.deployed_at), *previous)
        elif self.removed:
            previous = ()
        previous = tuple(p for p in previous if p.version != version)[:MAX_PREVIOUS]
        return FunctionRecord(self.name, version, file, dict(spec), now, self.generation + 1, origin, previous)

    def rolled_back(self, *, now: float, origin: str) -> FunctionRecord:
        """This function back on its latest previous version (which leaves the history)."""
        if self.removed or not self.previous:
            raise ValueError(f"function {self.name!r} has no previous version")
        back = self.previous[0]
        return FunctionRecord(self.name, back.version, back.file, dict(back.spec), now, self.generation + 1,
                              origin, self.previous[1:])

    def tombstone(self, *, now: float, origin: str) -> FunctionRecord:
        """This function removed everywhere."""
        return FunctionRecord(self.name, self.version, self.file, dict(self.spec), now, self.generation + 1,
                              origin, (), removed=True)

    @classmethod
    def new(cls, name: str, *, version: str, file: str, spec: Mapping[str, Any], now: float,
            origin: str) -> FunctionRecord:
        return cls(name, version, file, dict(spec), now, 1, origin)


def merge(ours: Mapping[str, FunctionRecord], theirs: Iterable[FunctionRecord]) -> dict[str, FunctionRecord]:
    """``ours`` with every record of ``theirs`` that beats ours (last writer wins, per name)."""
    table = dict(ours)
    for record in theirs:
        mine = table.get(record.name)
        if mine is None or record.order() > mine.order():
            table[record.name] = record
    return table


# ------------------------------------------------------------------ wire / disk form


def _past_to_json(p: PastVersion) -> dict[str, Any]:
    return {"version": p.version, "file": p.file, "spec": dict(p.spec), "deployed_at": p.deployed_at}


def record_to_json(r: FunctionRecord) -> dict[str, Any]:
    return {"name": r.name, "version": r.version, "file": r.file, "spec": dict(r.spec),
            "deployed_at": r.deployed_at, "generation": r.generation, "origin": r.origin,
            "previous": [_past_to_json(p) for p in r.previous], "removed": r.removed}


def _str(doc: Mapping[str, Any], key: str, limit: int = 512) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(f"function record: '{key}' must be a non-empty string")
    return value


def _version(doc: Mapping[str, Any]) -> str:
    value = _str(doc, "version")
    if not _VERSION.match(value):
        raise ValueError("function record: 'version' must be a BLAKE3 hex digest")
    return value


def _spec(doc: Mapping[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise ValueError("function record: 'spec' must be an object with a path")
    return spec


def _number(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"function record: '{key}' must be a number")
    return float(value)


def record_from_json(doc: Any) -> FunctionRecord:
    """Parse a record strictly (peers' tables are untrusted input); raises ValueError."""
    if not isinstance(doc, dict):
        raise ValueError("function record must be an object")
    name = _str(doc, "name", 63)
    if not _NAME.match(name):
        raise ValueError(f"function record: invalid name {name!r}")
    generation = doc.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError("function record: 'generation' must be a positive integer")
    previous_raw = doc.get("previous", [])
    if not isinstance(previous_raw, list) or len(previous_raw) > MAX_PREVIOUS:
        raise ValueError("function record: 'previous' must be a short list")
    previous = []
    for p in previous_raw:
        if not isinstance(p, dict):
            raise ValueError("function record: a previous version must be an object")
        previous.append(PastVersion(_version(p), _str(p, "file"), _spec(p), _number(p, "deployed_at")))
    removed = doc.get("removed", False)
    if not isinstance(removed, bool):
        raise ValueError("function record: 'removed' must be a boolean")
    return FunctionRecord(name, _version(doc), _str(doc, "file"), _spec(doc), _number(doc, "deployed_at"),
                          generation, _str(doc, "origin", 128), tuple(previous), removed)


# ------------------------------------------------------------------ the store


@dataclass
class FunctionStore:
    """Sources and the function table of one node, under ``root`` (``$OMX_HOME/functions``).

    Blocking file I/O: call it from a thread. Thread-safe.
    """

    root: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def blob_path(self, version: str) -> Path:
        if not _VERSION.match(version):
            raise ValueError(f"invalid function version {version!r}")
        return self.root / "blobs" / version

    def has_source(self, version: str) -> bool:
        return self.blob_path(version).is_file()

    def put_source(self, source: bytes, expected: str | None = None) -> str:
        """Store ``source`` under its BLAKE3; ``expected`` (a fetched blob's name) must match it."""
        if len(source) > MAX_SOURCE_BYTES:
            raise StoreError(f"function source is larger than {MAX_SOURCE_BYTES} bytes", status=413)
        version = source_version(source)
        if expected is not None and version != expected:
            raise IntegrityError(f"function source hashes to {version}, not {expected}")
        path = self.blob_path(version)
        if not path.is_file():
            atomic_write(path, source)
        return version

    def read_source(self, version: str) -> bytes:
        """A stored source, verified against its name; raises IntegrityError or FileNotFoundError."""
        data = self.blob_path(version).read_bytes()
        if source_version(data) != version:
            raise IntegrityError(f"function source {version} is damaged")
        return data

    def load(self) -> dict[str, FunctionRecord]:
        """The table as last saved (empty when none was); an unreadable file is an error, never ignored."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != _STATE_FORMAT:
                raise ValueError("unknown format")
            records = [record_from_json(r) for r in doc.get("functions", [])]
        except ValueError as exc:
            raise StoreError(f"function table {self.state_path} is unreadable: {exc}") from exc
        return {r.name: r for r in records}

    def save(self, table: Mapping[str, FunctionRecord]) -> None:
        """Write the table atomically."""
        doc = {"format": _STATE_FORMAT,
               "functions": [record_to_json(table[name]) for name in sorted(table)]}
        with self._lock:
            atomic_write(self.state_path, json.dumps(doc, indent=1) + "\n")

    def prune(self, table: Mapping[str, FunctionRecord]) -> None:
        """Drop the sources no record of ``table`` needs (at start, before any fetch is under way)."""
        needed = {v for r in table.values() for v in r.versions}
        folder = self.root / "blobs"
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if _VERSION.match(path.name) and path.name not in needed:
                path.unlink(missing_ok=True)
