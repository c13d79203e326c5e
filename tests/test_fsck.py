"""The soak's offline store fsck (tests/support/fsck.py) finds what it promises to find."""

from __future__ import annotations

from pathlib import Path

from omx.storage import MEDIA_MODEL, ModelStore
from tests.support.fsck import fsck
from tests.support.storage_gguf import write_gguf
from tests.test_storage_store import CS, collect, upload


async def test_fsck_is_clean_then_finds_a_bad_sha256_and_a_manifest_on_a_partial_blob(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", chunk_size=CS)
    digest = await upload(store, write_gguf(tmp_path / "m.gguf"))
    await collect(store.create("m", {"files": {"m.gguf": digest}, "template": "T"}))
    assert fsck(store.root, chunk_size=CS) == []

    model = (await store.resolve("m")).manifest.first(MEDIA_MODEL)
    assert model is not None
    path = store.blobs.own_path(model.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert f"blob {model.digest} does not match its sha256" in fsck(store.root, chunk_size=CS)

    path.unlink()
    (store.root / "partial").mkdir(exist_ok=True)
    (store.root / "partial" / f"{path.name}.data").write_bytes(data[:10])
    problems = fsck(store.root, chunk_size=CS)
    assert f"manifest registry.ollama.ai/library/m:latest: blob {model.digest} is only partial" in problems, problems
