"""Fetching a whole model from the peers that hold it: manifest, then every blob it names.

The manifest is taken byte for byte from a holder (so its digest, and this
node's inventory version, match theirs), checked against ``expected_digest``
when the caller knows it (e.g. from the holder's inventory), parsed, and
published only after every blob it names is present and verified: a model is
never visible half-fetched, and nothing is written when the store's disk has
less free space than the blobs still missing (a :class:`~omx.errors.StoreError`
says so). Blobs already held are skipped; the others come from all holders at
once through :class:`~omx.runtime.peer.transfers.Transfers` (which also copies
chunks this node already has in other blobs), and from the ``swarm``: peers
fetching the same model, which serve the chunks they got.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from omx.errors import IntegrityError, NotFound, OmxError, PeerError
from omx.runtime.peer.fetch import TransferProgress
from omx.runtime.peer.transfers import Transfers
from omx.storage import Layer, Manifest, ModelName, ModelStore, manifest_digest
from omx.storage.partial import read_partial_state
from omx.storage.registry.pending import FileManifests
from omx.storage.space import disk_error, require_room
from omx.types import BlobDigest, NodeId

__all__ = ["ModelFetched", "fetch_manifest", "fetch_model"]

LayerProgress = Callable[[Layer, TransferProgress], None]


@dataclass(frozen=True)
class ModelFetched:
    """The outcome of :func:`fetch_model`."""

    name: ModelName
    manifest: Manifest
    digest: BlobDigest
    """sha256 of the manifest bytes (what ``/api/tags`` shows)."""
    fetched: tuple[BlobDigest, ...]
    """Blobs that were transferred (the others were already here)."""


async def fetch_manifest(transfers: Transfers, name: ModelName, holders: Sequence[NodeId], *,
                         expected_digest: BlobDigest | None = None) -> tuple[bytes, Manifest]:
    """The manifest bytes of ``name`` from the first holder that serves a valid one."""
    errors: list[OmxError] = []
    for peer in holders:
        try:
            data = await transfers.transport.manifest(peer, name.full)
            if expected_digest is not None and manifest_digest(data) != expected_digest:
                raise IntegrityError(f"manifest digest {manifest_digest(data)} is not {expected_digest}")
            return data, Manifest.from_bytes(data)
        except OmxError as exc:
            errors.append(exc)
    if all(isinstance(e, NotFound) for e in errors):
        raise NotFound(f"no peer holds model '{name.display}'")
    raise PeerError(f"no peer served the manifest of '{name.display}': " + "; ".join(e.message for e in errors))


async def fetch_model(store: ModelStore, transfers: Transfers, name: ModelName | str, holders: Sequence[NodeId], *,
                      expected_digest: BlobDigest | None = None, on_progress: LayerProgress | None = None,
                      swarm: Sequence[NodeId] = (), spread: tuple[int, int] = (0, 1)) -> ModelFetched:
    """Fetch ``name`` from ``holders`` (peers that hold it complete) into ``store`` and publish it.

    ``swarm``: peers still fetching it (or about to), asked for chunks but not for the manifest;
    ``spread``: this node's rank among the nodes fetching it together, and their number.
    """
    model = ModelName.parse(name) if isinstance(name, str) else name
    data, manifest = await fetch_manifest(transfers, model, holders, expected_digest=expected_digest)
    need = await asyncio.to_thread(_missing_bytes, store, manifest)
    await asyncio.to_thread(require_room, store.root, need, f"'{model.display}'")
    fetched: list[BlobDigest] = []
    for layer in (*manifest.layers, manifest.config):
        if await asyncio.to_thread(store.blobs.has, layer.digest):
            continue

        def report(progress: TransferProgress, layer: Layer = layer) -> None:
            if on_progress is not None:
                on_progress(layer, progress)

        await transfers.fetch_from_peers(layer.digest, layer.size, [*holders, *swarm], on_progress=report,
                                         spread=spread)
        fetched.append(layer.digest)
    missing = [d for d in manifest.blobs if not await asyncio.to_thread(store.blobs.has, d)]
    if missing:
        raise IntegrityError(f"blob {missing[0]} of '{model.display}' is missing after the transfer")
    try:
        await asyncio.to_thread(FileManifests(store.root, store.extra_roots).write_manifest, model, data)
    except OSError as exc:
        raise disk_error(exc, f"the manifest of '{model.display}'", store.root) from exc
    return ModelFetched(model, manifest, manifest_digest(data), tuple(fetched))


def _missing_bytes(store: ModelStore, manifest: Manifest) -> int:
    """Bytes of ``manifest``'s blobs this node still has to write (chunks of partial blobs count as held)."""
    need = 0
    for layer in {layer.digest: layer for layer in (*manifest.layers, manifest.config)}.values():
        if store.blobs.has(layer.digest):
            continue
        part = read_partial_state(store.blobs, layer.digest)
        held = sum(min(part.chunk_size, layer.size - i * part.chunk_size) for i in part.held()) \
            if part is not None and part.size == layer.size else 0
        need += layer.size - held
    return need
