"""Blobs served in place from a read-only (coexist) store are verified once before use.

Each test builds an Ollama-layout store in a temp folder (real sha256 names and
sizes) and serves it as an extra root: a good blob is hashed once and the
verdict remembered across restarts under the writable root; a blob whose
content does not match its name is refused, in the store and through a real node.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from omx.errors import IntegrityError
from omx.storage.manifests import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MEDIA_MODEL, MEDIA_TEMPLATE
from omx.storage.names import ModelName
from omx.storage.store import ModelStore
from tests.support.node import start_node
from tests.support.tiny_gguf import write_tiny_llama

TEMPLATE = b"{{ .Prompt }}"


def _put_blob(store: Path, data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = store / "blobs" / digest.replace(":", "-")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def add_model(store: Path, name: str, weights: bytes) -> Path:
    """Write a model as Ollama lays it out; returns the path of its weights blob."""
    layers = [{"mediaType": MEDIA_MODEL, **_put_blob(store, weights)},
              {"mediaType": MEDIA_TEMPLATE, **_put_blob(store, TEMPLATE)}]
    config = {"model_format": "gguf", "model_family": "llama", "rootfs": {"type": "layers", "diff_ids": []}}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "layers": layers,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, **_put_blob(store, json.dumps(config).encode())}}
    n = ModelName.parse(name)
    path = store / "manifests" / n.host / n.namespace / n.model / n.tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return store / "blobs" / str(layers[0]["digest"]).replace(":", "-")


def corrupt(blob: Path) -> None:
    """Flip one byte in place, keeping the size (what bit rot or a bad copy does)."""
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=5, n_layer=1).read_bytes()


@pytest.fixture
def ollama(tmp_path: Path, gguf_bytes: bytes) -> Path:
    store = tmp_path / "ollama" / "models"
    add_model(store, "good:latest", gguf_bytes)
    corrupt(add_model(store, "bad:latest", gguf_bytes + b"\0" * 64))
    return store


def test_a_good_blob_is_hashed_once_and_remembered_across_restarts(tmp_path: Path, ollama: Path) -> None:
    root = tmp_path / "omx"
    store = ModelStore(root, extra_roots=[ollama])
    resolved = store.resolve_sync("good")
    assert resolved.model_path.parent == ollama / "blobs"
    assert store.verifier.hashed == 3  # weights, template and config, each once
    store.resolve_sync("good")
    assert store.verifier.hashed == 3
    assert len(list((root / "verified").glob("sha256-*.json"))) == 3

    restarted = ModelStore(root, extra_roots=[ollama])
    restarted.resolve_sync("good")
    assert restarted.verifier.hashed == 0

    os.utime(resolved.model_path, ns=(1, 1))  # a changed file is hashed afresh
    again = ModelStore(root, extra_roots=[ollama])
    again.resolve_sync("good")
    assert again.verifier.hashed == 1


def test_a_corrupt_blob_is_refused_and_the_verdict_remembered(tmp_path: Path, ollama: Path) -> None:
    root = tmp_path / "omx"
    store = ModelStore(root, extra_roots=[ollama])
    counts = []
    for _ in range(2):
        with pytest.raises(IntegrityError) as err:
            store.resolve_sync("bad")
        assert "corrupt" in str(err.value) and str(ollama) in str(err.value)
        assert "models.extra_stores" in str(err.value)
        counts.append(store.verifier.hashed)
    assert counts[0] >= 1 and counts[1] == counts[0]  # refused again without hashing again

    restarted = ModelStore(root, extra_roots=[ollama])
    with pytest.raises(IntegrityError):
        restarted.resolve_sync("bad")
    assert restarted.verifier.hashed == 0
    assert {e.name for e in restarted.list_models_sync()} >= {"good:latest", "bad:latest"}


async def test_a_cached_model_whose_blob_changes_is_verified_again(tmp_path: Path, ollama: Path) -> None:
    store = ModelStore(tmp_path / "omx", extra_roots=[ollama])
    resolved = await store.resolve("good")
    assert await store.resolve("good") is resolved  # answered from memory
    corrupt(resolved.model_path)
    with pytest.raises(IntegrityError):
        await store.resolve("good")


def test_concurrent_first_uses_hash_each_blob_once(tmp_path: Path, ollama: Path) -> None:
    store = ModelStore(tmp_path / "omx", extra_roots=[ollama])
    errors: list[BaseException] = []

    def use() -> None:
        try:
            store.resolve_sync("good")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert store.verifier.hashed == 3


def test_own_blobs_are_not_rehashed(tmp_path: Path, gguf_bytes: bytes) -> None:
    root = tmp_path / "omx"
    add_model(root, "mine:latest", gguf_bytes)
    store = ModelStore(root)
    store.resolve_sync("mine")
    assert store.verifier.hashed == 0


@pytest.mark.e2e
def test_a_node_serves_the_good_coexist_model_and_refuses_the_corrupt_one(tmp_path: Path, ollama: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(f"models:\n  extra_stores: [{json.dumps(str(ollama))}]\n")
    node = start_node(home)
    try:
        with node.client() as http:
            good = http.post("/api/generate", json={"model": "good", "prompt": "hello", "stream": False,
                                                    "options": {"num_predict": 2, "temperature": 0}})
            bad = http.post("/api/generate", json={"model": "bad", "prompt": "hello", "stream": False})
    finally:
        node.stop()
    assert good.status_code == 200, good.text
    assert good.json()["eval_count"] == 2
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert "corrupt" in error and "read-only store" in error and "Traceback" not in bad.text
