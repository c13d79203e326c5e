"""The store scan behind a node's holdings: models, blobs, partial blobs, damage, metadata."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omx.storage import CONFIG_MEDIA_TYPE, MEDIA_MODEL, Layer, Manifest, ModelName, ModelStore, PartialBlob
from omx.storage.damaged import mark_damaged
from omx.storage.holdings_meta import HoldingsMeta, MetaState
from omx.storage.holdings_scan import HoldingsScanner, read_holdings
from omx.types import BlobDigest

CS = 64 * 1024


def _model(store: ModelStore, name: str, payload: bytes) -> Manifest:
    config = store.blobs.write_bytes(b'{"model_format":"gguf"}')
    weights = store.blobs.write_bytes(payload)
    manifest = Manifest(config=Layer(CONFIG_MEDIA_TYPE, config.digest, config.size),
                        layers=(Layer(MEDIA_MODEL, weights.digest, weights.size),))
    store.write_manifest(ModelName.parse(name), manifest)
    return manifest


def test_scan_reads_models_blobs_partials_and_meta(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", chunk_size=CS)
    meta = HoldingsMeta(store.root)
    a = _model(store, "alpha", os.urandom(3 * CS + 7))
    _model(store, "beta:v2", os.urandom(CS))
    scanner = HoldingsScanner(store, cache_limit=10**12)
    first = scanner.scan(meta.state())
    assert [m.name for m in first.models] == ["alpha:latest", "beta:v2"]
    alpha = first.model("ALPHA")
    assert alpha is not None and alpha.origin == "user" and alpha.size == a.total_size
    assert [r.digest for r in alpha.blobs] == list(a.blobs) and alpha.created_at == alpha.modified_at
    weights = first.blob(a.layers[0].digest)
    idx = store.blobs.stored_index(a.layers[0].digest)
    assert weights is not None and idx is not None
    assert (weights.size, weights.chunk_size, weights.root, weights.read_only) == (3 * CS + 7, CS, idx.root, False)
    assert first.free_bytes > 0 and first.cache_limit == 10**12 and first.partials == ()

    # A replica record applies to its digest only; a partial blob and a transfer appear.
    rec_digest = first.model("alpha").digest  # type: ignore[union-attr]
    meta.record("alpha", rec_digest, origin="replica", created_at=42.0, now=50.0)
    meta.begin("gamma", BlobDigest("sha256:" + "c" * 64), origin="replica", now=60.0)
    data = os.urandom(2 * CS + 1)
    pdigest = BlobDigest("sha256:" + hashlib.sha256(data).hexdigest())
    part = PartialBlob.open(store.blobs, pdigest, len(data), CS)
    part.write_chunk(1, data[CS:2 * CS])
    sig = scanner.signature()
    second = scanner.scan(meta.state())
    alpha2 = second.model("alpha")
    assert alpha2 is not None and (alpha2.origin, alpha2.created_at) == ("replica", 42.0)
    assert alpha2.last_used >= 50.0
    (p,) = second.partials
    assert (p.digest, p.size, p.chunk_size, p.held()) == (pdigest, len(data), CS, [1])
    assert [i.name for i in second.incoming] == ["gamma:latest"]
    assert second.version != first.version
    assert scanner.signature() == sig
    part.write_chunk(0, data[:CS])
    assert scanner.signature() != sig


def test_scan_leaves_out_incomplete_and_damaged_models(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", chunk_size=CS)
    a = _model(store, "alpha", os.urandom(CS))
    b = _model(store, "beta", os.urandom(CS))
    store.blobs.delete(b.layers[0].digest)
    mark_damaged(store.blobs, a.layers[0].digest, "test")
    h = read_holdings(store, MetaState())
    assert h.models == ()
    assert h.blob(a.layers[0].digest) is None and h.blob(a.config.digest) is not None


def test_scan_marks_blobs_of_extra_roots_read_only(tmp_path: Path) -> None:
    extra = ModelStore(tmp_path / "ollama", chunk_size=CS)
    m = _model(extra, "shared", os.urandom(CS))
    for p in (extra.root / "chunks").iterdir():
        p.unlink()
    store = ModelStore(tmp_path / "store", chunk_size=CS, extra_roots=[extra.root])
    h = read_holdings(store, MetaState())
    (held,) = h.models
    assert held.read_only and held.name == "shared:latest"
    blob = h.blob(m.layers[0].digest)
    assert blob is not None and blob.read_only and blob.root is None and blob.chunk_size is None
    assert h.used_bytes == 0
