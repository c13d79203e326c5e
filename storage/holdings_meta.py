"""The node's own records about its models: ``<store>/cluster/holdings.json``.

What the store's files cannot say is kept here, per model: the **origin** of the
copy (``user``/``replica``/``demand``), when its version was **created** at its origin
(replicas carry the original's time), and when it was **last used** here; the
**factor overrides** this node knows of (set here or adopted from peers, last
writer wins); and the **transfers under way** (:class:`~omx.storage.holdings.Incoming`)
so a restarted node resumes them.

A model record names the manifest digest it describes: when the manifest under
that name changes without a new record (a user re-created or pulled it), the
record no longer applies and the copy counts as a ``user`` copy created at its
manifest's time. So the replicator writes its record *before* it publishes a
replica's manifest.

Every change is written at once (atomically, temp + fsync + rename) except
``last_used``, which is kept in memory and written at most once per
``touch_every_s`` per model (a request must not cost a disk write); a crash loses
at most that much recency. The methods are thread-safe and blocking (small file).
A file that cannot be parsed is moved aside to ``holdings.json.corrupt`` and the
records start empty. Names are stored in their canonical display form
(:func:`~omx.storage.holdings.canonical_name`; an invalid name raises
:class:`~omx.errors.InvalidModelName`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omx.fsutil import atomic_write
from omx.types import BlobDigest

from .health import store_tmp
from .holdings import MAX_FACTOR, ORIGINS, FactorOverride, Incoming, Origin, canonical_name, model_key

__all__ = ["HoldingsMeta", "MetaState", "ModelRecord"]

META_FILE = Path("cluster") / "holdings.json"


@dataclass(frozen=True)
class ModelRecord:
    """What this node knows about its copy of ``name`` at manifest ``digest``."""

    name: str
    digest: BlobDigest
    origin: Origin
    created_at: float
    last_used: float = 0.0

    @property
    def key(self) -> str:
        return model_key(self.name)


@dataclass(frozen=True)
class MetaState:
    """An immutable snapshot of the records, by model key."""

    models: dict[str, ModelRecord] = field(default_factory=dict)
    factors: dict[str, FactorOverride] = field(default_factory=dict)
    incoming: dict[str, Incoming] = field(default_factory=dict)

    def record_for(self, name: str, digest: BlobDigest) -> ModelRecord | None:
        """The record of ``name`` if it describes manifest ``digest`` (else the record is stale)."""
        rec = self.models.get(model_key(name))
        return rec if rec is not None and rec.digest == digest else None


class HoldingsMeta:
    """Reads and writes ``<store_root>/cluster/holdings.json`` (see the module docstring)."""

    def __init__(self, store_root: Path, *, touch_every_s: float = 60.0) -> None:
        self.root = Path(store_root)
        self.path = self.root / META_FILE
        self.touch_every_s = touch_every_s
        self._lock = threading.Lock()
        self._state = self._load()
        self._written_used: dict[str, float] = {k: r.last_used for k, r in self._state.models.items()}

    # ------------------------------------------------------------ reading

    def state(self) -> MetaState:
        """The current records (a snapshot; later changes do not alter it)."""
        with self._lock:
            return self._state

    def _load(self) -> MetaState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return MetaState()
        try:
            return _parse(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError):
            os.replace(self.path, self.path.with_name(self.path.name + ".corrupt"))
            return MetaState()

    # ------------------------------------------------------------ model records

    def record(self, name: str, digest: BlobDigest, *, origin: Origin, created_at: float, now: float) -> ModelRecord:
        """Record the copy of ``name`` at ``digest`` (call before publishing its manifest)."""
        if origin not in ORIGINS:
            raise ValueError(f"unknown origin {origin!r}")
        rec = ModelRecord(canonical_name(name), digest, origin, created_at, now)
        self._change(lambda s: replace(s, models={**s.models, rec.key: rec}))
        return rec

    def touch(self, name: str, now: float) -> None:
        """Note that ``name`` was used at ``now`` (written to disk at most every ``touch_every_s``)."""
        key = model_key(name)
        with self._lock:
            rec = self._state.models.get(key)
            if rec is None or now <= rec.last_used:
                return
            self._state = replace(self._state, models={**self._state.models, key: replace(rec, last_used=now)})
            if now - self._written_used.get(key, 0.0) < self.touch_every_s:
                return
            self._write()

    def last_used(self, name: str) -> float | None:
        rec = self.state().models.get(model_key(name))
        return rec.last_used if rec is not None else None

    def forget(self, name: str) -> None:
        """Drop the record of a model no longer held (its factor override stays)."""
        key = model_key(name)
        self._change(lambda s: replace(s, models={k: v for k, v in s.models.items() if k != key}))

    def prune(self, keep: Iterable[str]) -> None:
        """Drop the records of every model whose name is not in ``keep``."""
        kept = {model_key(n) for n in keep}
        if set(self.state().models) <= kept:
            return
        self._change(lambda s: replace(s, models={k: v for k, v in s.models.items() if k in kept}))

    # ------------------------------------------------------------ factors

    def set_factor(self, name: str, factor: int | None, now: float) -> FactorOverride:
        """Set (``None``: reset to the default) a model's replication factor, as of ``now``."""
        if factor is not None and not 1 <= factor <= MAX_FACTOR:
            raise ValueError(f"replication factor must be between 1 and {MAX_FACTOR}")
        override = FactorOverride(canonical_name(name), factor, now)
        self._change(lambda s: replace(s, factors={**s.factors, override.key: override}))
        return override

    def adopt_factors(self, overrides: Iterable[FactorOverride]) -> bool:
        """Keep every override newer than the one recorded (last writer wins); True when any was."""
        with self._lock:
            factors = dict(self._state.factors)
            changed = False
            for o in overrides:
                current = factors.get(o.key)
                if current is None or o.supersedes(current):
                    factors[o.key] = o
                    changed = True
            if changed:
                self._state = replace(self._state, factors=factors)
                self._write()
            return changed

    # ------------------------------------------------------------ transfers

    def begin(self, name: str, digest: BlobDigest, *, origin: Origin, now: float) -> Incoming:
        """Record a transfer of ``name`` at ``digest`` before its first byte is fetched."""
        entry = Incoming(canonical_name(name), digest, origin, now, now)
        self._change(lambda s: replace(s, incoming={**s.incoming, entry.key: entry}))
        return entry

    def progress(self, name: str, now: float) -> None:
        """Note progress of a transfer (written at most every ``touch_every_s``)."""
        key = model_key(name)
        with self._lock:
            entry = self._state.incoming.get(key)
            if entry is None or now - entry.updated_at < self.touch_every_s:
                return
            self._state = replace(self._state, incoming={**self._state.incoming,
                                                         key: replace(entry, updated_at=now)})
            self._write()

    def end(self, name: str) -> None:
        """Forget a transfer (finished, failed or abandoned)."""
        key = model_key(name)
        if key in self.state().incoming:
            self._change(lambda s: replace(s, incoming={k: v for k, v in s.incoming.items() if k != key}))

    # ------------------------------------------------------------ writing

    def _change(self, change: Any) -> None:
        with self._lock:
            self._state = change(self._state)
            self._write()

    def _write(self) -> None:
        s = self._state
        doc = {
            "version": 1,
            "models": [{"name": r.name, "digest": r.digest, "origin": r.origin, "created_at": r.created_at,
                        "last_used": r.last_used} for r in s.models.values()],
            "factors": [{"model": f.model, "factor": f.factor, "set_at": f.set_at} for f in s.factors.values()],
            "incoming": [{"name": i.name, "digest": i.digest, "origin": i.origin, "started_at": i.started_at,
                          "updated_at": i.updated_at} for i in s.incoming.values()],
        }
        atomic_write(self.path, json.dumps(doc, indent=1), tmp_dir=store_tmp(self.root))
        self._written_used = {k: r.last_used for k, r in s.models.items()}


def _origin(value: Any) -> Origin:
    if value not in ORIGINS:
        raise ValueError(f"unknown origin {value!r}")
    return value  # type: ignore[no-any-return]


def _parse(doc: Any) -> MetaState:
    if doc.get("version") != 1:
        raise ValueError("unknown holdings.json version")
    models = [ModelRecord(str(r["name"]), BlobDigest(str(r["digest"])), _origin(r["origin"]),
                          float(r["created_at"]), float(r.get("last_used", 0.0))) for r in doc.get("models", [])]
    factors = [FactorOverride(str(f["model"]), None if f["factor"] is None else int(f["factor"]),
                              float(f["set_at"])) for f in doc.get("factors", [])]
    incoming = [Incoming(str(i["name"]), BlobDigest(str(i["digest"])), _origin(i["origin"]),
                         float(i["started_at"]), float(i["updated_at"])) for i in doc.get("incoming", [])]
    return MetaState(models={r.key: r for r in models}, factors={f.key: f for f in factors},
                     incoming={i.key: i for i in incoming})
