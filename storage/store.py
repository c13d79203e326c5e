"""The model store: manifests over the blob store, the API the handlers call.

``ModelStore`` owns one writable root and reads any number of extra roots (an
Ollama store read in place). Public coroutine methods run their blocking work
in threads; the ``*_sync`` variants are for the CLI and tests.

Write order, which keeps every invariant through a crash at any point:
blob index -> blob -> config blob -> manifest (each temp + fsync + rename +
directory fsync). Deletion goes the other way: manifest first, then the blobs
no other manifest references. Manifest changes and collection hold the store
lock (``<root>/.lock``), so a blob is never collected between the moment a
create checks it and the moment its manifest is published.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omx.errors import Forbidden, IntegrityError, InvalidModelName, InvalidRequest, ModelNotFound, NotFound
from omx.fsutil import atomic_write, fsync_dir
from omx.timefmt import iso_time
from omx.types import BlobDigest

from . import health
from ._lock import store_lock
from .blobs import BlobStore
from .chunks import DEFAULT_CHUNK_SIZE
from .gguf_meta import GGUFInfo, read_gguf_info
from .manifests import (
    MEDIA_ADAPTER,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Manifest,
    ModelConfig,
    manifest_digest,
)
from .modelfile import format_modelfile, format_parameters
from .models import ModelDetails, ModelEntry, ResolvedModel
from .names import ModelName
from .verified import BlobVerifier

__all__ = ["ModelStore"]

_GC_GRACE_SECONDS = 3600.0


class ModelStore:
    """Models under ``root`` (writable) and ``extra_roots`` (read-only).

    Opening touches nothing: the node runs :meth:`recover` once at start, in a worker thread.
    """

    def __init__(
        self, root: Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE, extra_roots: Sequence[Path] = ()
    ) -> None:
        self.root = Path(root)
        self.extra_roots = tuple(Path(r) for r in extra_roots)
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root, self.extra_roots, chunk_size=chunk_size)
        self.verifier = BlobVerifier(self.root)
        """Hash-once checks of the blobs served in place from the extra roots."""
        self._gguf_cache: dict[BlobDigest, GGUFInfo | None] = {}
        # Resolved models by manifest path, valid while the manifest file is unchanged
        # (a manifest is only ever replaced by rename, which changes its inode).
        self._resolved: dict[str, tuple[tuple[int, int, int], tuple[str, ...], tuple[tuple[BlobDigest, Path], ...],
                                        ResolvedModel]] = {}
        self._manifest_paths: dict[str, tuple[str, ...]] = {}
        """Request model name -> its manifest path in each root (names are parsed once)."""
        self._cache_lock = threading.Lock()

    # ================================================================ manifests

    def _roots(self) -> tuple[Path, ...]:
        return (self.root, *self.extra_roots)

    def _manifests(self) -> Iterator[tuple[ModelName, Path, bool]]:
        """``(name, manifest path, writable)`` for every model; the writable root shadows the others."""
        seen: set[tuple[str, str, str, str]] = set()
        for root in self._roots():
            base = root / "manifests"
            for path in sorted(base.glob("*/*/*/*")):
                if not path.is_file() or any(p.startswith(".") for p in path.relative_to(base).parts):
                    continue
                host, ns, model, tag = path.relative_to(base).parts
                try:
                    name = ModelName.parse(f"{host}/{ns}/{model}:{tag}")
                except InvalidModelName:
                    continue
                if name.parts != (host, ns, model, tag) or name.key in seen:
                    continue
                seen.add(name.key)
                yield name, path, root == self.root

    def _find(self, name: ModelName | str) -> tuple[ModelName, Path, bool]:
        """The stored name, manifest path and writability of ``name`` (case-insensitive)."""
        n = ModelName.parse(name) if isinstance(name, str) else name
        for root in self._roots():
            p = n.manifest_path(root)
            if p.is_file():
                return n, p, root == self.root
        for found in self._manifests():
            if found[0].key == n.key:
                return found
        raise ModelNotFound(name if isinstance(name, str) else n.display)

    def _read_manifest(self, path: Path) -> tuple[Manifest, BlobDigest, bytes]:
        data = path.read_bytes()
        return Manifest.from_bytes(data), manifest_digest(data), data

    def _read_text(self, digest: BlobDigest) -> str:
        return self.blobs.path(digest).read_text(encoding="utf-8")

    def _read_json(self, digest: BlobDigest) -> Any:
        try:
            return json.loads(self.blobs.path(digest).read_bytes())
        except ValueError as e:
            raise IntegrityError(f"blob {digest} is not valid JSON: {e}") from e

    def _config(self, manifest: Manifest) -> ModelConfig:
        try:
            return ModelConfig.from_bytes(self.blobs.path(manifest.config.digest).read_bytes())
        except NotFound:
            return ModelConfig()

    # ================================================================ reads

    def list_models_sync(self) -> list[ModelEntry]:
        entries = []
        for name, path, writable in self._manifests():
            try:
                manifest, digest, _ = self._read_manifest(path)
                config = self._config(manifest)
                mtime = path.stat().st_mtime
            except (IntegrityError, OSError):
                continue
            model_layer = manifest.first(MEDIA_MODEL)
            parent = (model_layer.from_ or "") if model_layer else ""
            entries.append(ModelEntry(
                name=name.display, model=name.full, digest=digest, size=manifest.total_size,
                modified_at=datetime.fromtimestamp(mtime, UTC).astimezone(),
                details=ModelDetails.from_config(config, parent), read_only=not writable,
            ))
        entries.sort(key=lambda e: e.modified_at, reverse=True)
        return entries

    async def list_models(self) -> list[ModelEntry]:
        """Every model, newest first (``/api/tags``)."""
        return await asyncio.to_thread(self.list_models_sync)

    def gguf_info(self, digest: BlobDigest) -> GGUFInfo | None:
        """GGUF metadata of a model blob, cached per digest (None when the blob is not GGUF)."""
        with self._cache_lock:
            if digest in self._gguf_cache:
                return self._gguf_cache[digest]
        try:
            info: GGUFInfo | None = read_gguf_info(self.blobs.path(digest))
        except InvalidRequest:
            info = None
        with self._cache_lock:
            self._gguf_cache[digest] = info
        return info

    @staticmethod
    def _signature(path: Path | str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _paths_for(self, name: ModelName | str) -> tuple[str, ...]:
        if not isinstance(name, str):
            return tuple(str(name.manifest_path(root)) for root in self._roots())
        paths = self._manifest_paths.get(name)
        if paths is None:
            parsed = ModelName.parse(name)
            paths = tuple(str(parsed.manifest_path(root)) for root in self._roots())
            if len(self._manifest_paths) >= 4096:
                self._manifest_paths.clear()
            self._manifest_paths[name] = paths
        return paths

    def _cached(self, name: ModelName | str) -> ResolvedModel | None:
        """The resolved model for ``name`` if its manifest is unchanged since it was read (a stat per root)."""
        for path in self._paths_for(name):
            with self._cache_lock:
                entry = self._resolved.get(path)
            if entry is not None:
                signature, own_paths, extra_blobs, resolved = entry
                if (self._signature(path) == signature and all(os.path.exists(p) for p in own_paths)
                        and all(self.verifier.known_good(d, p) for d, p in extra_blobs)):
                    return resolved
                return None
        return None

    def resolve_sync(self, name: ModelName | str) -> ResolvedModel:
        stored, path, _ = self._find(name)
        signature = self._signature(path)
        resolved = self._resolve_at(stored, path)
        if signature is not None and self._signature(path) == signature:
            located = [(d, self.blobs.path(d)) for d in resolved.manifest.blobs]
            own_paths = tuple(str(p) for _d, p in located if self._is_own(p))
            extra_blobs = tuple((d, p) for d, p in located if not self._is_own(p))
            with self._cache_lock:
                self._resolved[str(path)] = (signature, own_paths, extra_blobs, resolved)
        return resolved

    def _resolve_at(self, stored: ModelName, path: Path) -> ResolvedModel:
        manifest, digest, _ = self._read_manifest(path)
        config = self._config(manifest)
        model = manifest.first(MEDIA_MODEL)
        if model is None:
            raise IntegrityError(f"model '{stored.display}' has no model layer")
        missing = [d for d in manifest.blobs if not self.blobs.has(d)]
        if missing:
            raise IntegrityError(f"model '{stored.display}' is incomplete: blob {missing[0]} is missing")
        self._verify_extra(manifest)

        def text(media: str) -> str | None:
            layer = manifest.first(media)
            return self._read_text(layer.digest) if layer else None

        params_layer = manifest.first(MEDIA_PARAMS)
        messages_layer = manifest.first(MEDIA_MESSAGES)
        params = self._read_json(params_layer.digest) if params_layer else {}
        messages = self._read_json(messages_layer.digest) if messages_layer else []
        if not isinstance(params, dict) or not isinstance(messages, list):
            raise IntegrityError(f"model '{stored.display}' has malformed params or messages")
        return ResolvedModel(
            name=stored,
            manifest=manifest,
            manifest_digest=digest,
            config=config,
            model_digest=model.digest,
            model_path=self.blobs.path(model.digest),
            model_size=model.size,
            adapter_paths=tuple(self.blobs.path(x.digest) for x in manifest.layers_of(MEDIA_ADAPTER)),
            projector_paths=tuple(self.blobs.path(x.digest) for x in manifest.layers_of(MEDIA_PROJECTOR)),
            template=text(MEDIA_TEMPLATE),
            system=text(MEDIA_SYSTEM),
            license=tuple(self._read_text(x.digest) for x in manifest.layers_of(MEDIA_LICENSE)),
            messages=tuple(messages),
            params=params,
            details=ModelDetails.from_config(config, model.from_ or ""),
            modified_at=datetime.fromtimestamp(path.stat().st_mtime, UTC).astimezone(),
            gguf=self.gguf_info(model.digest),
            size=manifest.total_size,
        )

    def _is_own(self, blob: Path) -> bool:
        return blob.parent == self.root / "blobs"

    def _verify_extra(self, manifest: Manifest) -> None:
        """Hash, once, each blob served in place from an extra root; a corrupt one is refused."""
        for d in manifest.blobs:
            blob = self.blobs.path(d)
            if not self._is_own(blob):
                self.verifier.verify(d, blob)

    async def resolve(self, name: ModelName | str) -> ResolvedModel:
        """Everything about one model; :class:`ModelNotFound` (``model 'x' not found``) if absent.

        A model whose manifest is unchanged since it was last read is answered from
        memory: the hot path of every inference request costs a ``stat`` per file.
        Blobs of an extra root are verified (hashed in a worker thread) on first use;
        see :mod:`omx.storage.verified`.
        """
        cached = self._cached(name)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.resolve_sync, name)

    def show_sync(self, name: ModelName | str, *, verbose: bool = False) -> dict[str, Any]:
        m = self.resolve_sync(name)
        model_info: dict[str, Any] = {}
        if m.gguf is not None:
            model_info = dict(read_gguf_info(m.model_path, verbose=True).model_info) if verbose \
                else dict(m.gguf.model_info)
        out: dict[str, Any] = {}
        if m.license:
            out["license"] = "\n".join(m.license)
        out["modelfile"] = format_modelfile(
            model_path=str(m.model_path), short_name=m.name.display, template=m.template, system=m.system,
            parameters=m.params, adapter_paths=[str(p) for p in m.adapter_paths], license=m.license,
            messages=m.messages,
        )
        if m.params:
            out["parameters"] = format_parameters(m.params)
        if m.template is not None:
            out["template"] = m.template
        if m.system:
            out["system"] = m.system
        out["details"] = m.details.to_dict()
        if m.messages:
            out["messages"] = list(m.messages)
        out["model_info"] = model_info
        out["capabilities"] = m.capabilities
        out["modified_at"] = iso_time(m.modified_at)
        return out

    async def show(self, name: ModelName | str, *, verbose: bool = False) -> dict[str, Any]:
        """The body of ``/api/show`` for ``name``."""
        return await asyncio.to_thread(self.show_sync, name, verbose=verbose)

    # ================================================================ writes

    def write_manifest(self, name: ModelName, manifest: Manifest) -> BlobDigest:
        """Publish a manifest atomically once every blob it names exists. Takes the store lock."""
        data = manifest.to_bytes()
        with store_lock(self.root):
            missing = [d for d in manifest.blobs if not self.blobs.has(d)]
            if missing:
                raise InvalidRequest(f"blob {missing[0]} not found: upload it with POST /api/blobs first")
            target = self._existing_spelling(name)
            atomic_write(target.manifest_path(self.root), data, tmp_dir=health.store_tmp(self.root))
        return manifest_digest(data)

    def _existing_spelling(self, name: ModelName) -> ModelName:
        # A name differing only in case refers to the existing model, as in Ollama.
        for found, _path, writable in self._manifests():
            if writable and found.key == name.key:
                return found
        return name

    def copy_sync(self, src: ModelName | str, dst: ModelName | str) -> None:
        _, path, _ = self._find(src)
        target = ModelName.parse(dst) if isinstance(dst, str) else dst
        manifest, _, data = self._read_manifest(path)
        with store_lock(self.root):
            missing = [d for d in manifest.blobs if not self.blobs.has(d)]
            if missing:
                raise IntegrityError(f"cannot copy: blob {missing[0]} is missing")
            atomic_write(self._existing_spelling(target).manifest_path(self.root), data,
                         tmp_dir=health.store_tmp(self.root))

    async def copy(self, src: ModelName | str, dst: ModelName | str) -> None:
        """Give ``src``'s manifest (byte for byte, so the same digest) the name ``dst``."""
        await asyncio.to_thread(self.copy_sync, src, dst)

    def delete_sync(self, name: ModelName | str) -> list[BlobDigest]:
        stored, path, writable = self._find(name)
        if not writable:
            raise Forbidden(f"model '{stored.display}' is in a read-only store and cannot be deleted here")
        manifest, _, _ = self._read_manifest(path)
        with store_lock(self.root):
            path.unlink()
            fsync_dir(path.parent)
            _prune_empty_dirs(path.parent, self.root / "manifests")
            referenced = self._referenced()
            removed = [d for d in manifest.blobs if d not in referenced and self.blobs.delete(d)]
        return removed

    async def delete(self, name: ModelName | str) -> list[BlobDigest]:
        """Remove a model, then its blobs no other manifest references; returns the removed digests."""
        return await asyncio.to_thread(self.delete_sync, name)

    def _referenced(self) -> set[BlobDigest]:
        refs: set[BlobDigest] = set()
        for path in self._manifest_paths_all_roots():
            try:
                refs.update(Manifest.from_bytes(path.read_bytes()).blobs)
            except (IntegrityError, OSError):
                continue
        return refs

    def _manifest_paths_all_roots(self) -> Iterator[Path]:
        # Unlike _manifests, shadowed manifests count too: they still reference blobs.
        for root in self._roots():
            for path in (root / "manifests").glob("*/*/*/*"):
                if path.is_file():
                    yield path

    def gc_sync(self, *, grace_seconds: float = _GC_GRACE_SECONDS) -> list[BlobDigest]:
        """Remove writable-root blobs no manifest references, older than ``grace_seconds``.

        The grace period protects blobs uploaded for a create that has not run yet.
        Extra roots are never touched.
        """
        now = time.time()
        removed = []
        with store_lock(self.root):
            referenced = self._referenced()
            for d in self.blobs.digests():
                if d in referenced:
                    continue
                try:
                    age = now - self.blobs.own_path(d).stat().st_mtime
                except FileNotFoundError:
                    continue
                if age >= grace_seconds and self.blobs.delete(d):
                    removed.append(d)
        return removed

    async def gc(self, *, grace_seconds: float = _GC_GRACE_SECONDS) -> list[BlobDigest]:
        return await asyncio.to_thread(self.gc_sync, grace_seconds=grace_seconds)

    # ================================================================ create

    def create(self, name: ModelName | str, request: Any) -> AsyncIterator[str]:
        """Create ``name`` from a :class:`CreateRequest`; yields Ollama's progress statuses.

        Request errors (bad name, missing blobs, a FROM path, ``quantize``…) are raised
        by the first ``__anext__``, before any status is yielded, so a handler can
        answer them with a 4xx before it starts streaming.
        """
        from .create import run_create

        return run_create(self, name, request)

    # ================================================================ health

    def check_sync(self, *, deep: bool = False) -> list[str]:
        """Problems found (empty when healthy). ``deep`` re-hashes every blob of the writable root."""
        return health.check(self, deep=deep)

    async def check(self, *, deep: bool = False) -> list[str]:
        """fsck: every manifest's blobs exist with the right size, every own blob has an index."""
        return await asyncio.to_thread(self.check_sync, deep=deep)

    def recover(self) -> list[str]:
        """Remove what a crash can leave behind; returns what was done. Safe while others write."""
        return health.recover(self)


def _prune_empty_dirs(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
