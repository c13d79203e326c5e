from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from omx.errors import Forbidden, IntegrityError, InvalidModelName, InvalidRequest, ModelNotFound
from omx.storage import (
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_TEMPLATE,
    CreateRequest,
    Manifest,
    ModelStore,
    parse_digest,
)
from omx.types import BlobDigest
from tests.support.storage_gguf import write_gguf

CS = 64 * 1024


async def upload(store: ModelStore, path: Path) -> BlobDigest:
    data = await asyncio.to_thread(path.read_bytes)

    async def body() -> AsyncIterator[bytes]:
        yield data

    info = await store.blobs.write(body(), expected=parse_digest("sha256:" + hashlib.sha256(data).hexdigest()))
    return info.digest


async def collect(it: AsyncIterator[str]) -> list[str]:
    return [s async for s in it]


@pytest.fixture
async def store_and_model(tmp_path: Path) -> tuple[ModelStore, BlobDigest]:
    store = ModelStore(tmp_path / "store", chunk_size=CS)
    digest = await upload(store, write_gguf(tmp_path / "m.gguf", chat_template="{{ .Tools }} {{ .Suffix }}"))
    return store, digest


async def test_create_from_files_list_show(store_and_model: tuple[ModelStore, BlobDigest]) -> None:
    store, digest = store_and_model
    req = CreateRequest.model_validate({
        "model": "tiny", "files": {"m.gguf": digest}, "template": "{{ .Prompt }} {{ .Tools }}",
        "system": "be brief", "license": ["MIT", "Apache"], "parameters": {"temperature": 0.5, "stop": ["x"]},
        "messages": [{"role": "user", "content": "hi"}],
    })
    statuses = await collect(store.create("tiny", req))
    assert statuses[0] == "parsing GGUF" and statuses[1] == f"using existing layer {digest}"
    assert sum(s.startswith("creating new layer sha256:") for s in statuses) == 6
    assert statuses[-2:] == ["writing manifest", "success"]

    [entry] = await store.list_models()
    assert entry.name == "tiny:latest" and entry.model == "registry.ollama.ai/library/tiny:latest"
    manifest_bytes = (store.root / "manifests/registry.ollama.ai/library/tiny/latest").read_bytes()
    assert entry.digest == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    manifest = Manifest.from_bytes(manifest_bytes)
    assert entry.size == manifest.total_size
    assert entry.modified_at.tzinfo is not None
    assert entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.families == ("llama",)
    assert entry.details.parameter_size == "208" and entry.details.quantization_level == "Q4_K_M"
    wire = entry.to_dict()
    assert wire["digest"] == entry.digest[7:] and wire["size"] == entry.size
    datetime.fromisoformat(wire["modified_at"])

    m = await store.resolve("TINY:Latest")
    assert m.model_digest == digest and m.model_path.read_bytes()[:4] == b"GGUF"
    assert m.template == "{{ .Prompt }} {{ .Tools }}" and m.system == "be brief"
    assert m.license == ("MIT", "Apache") and m.params == {"temperature": 0.5, "stop": ["x"]}
    assert m.messages == ({"role": "user", "content": "hi"},)
    assert m.gguf is not None and m.gguf.context_length == 4096

    shown = await store.show("tiny")
    assert shown["license"] == "MIT\nApache"
    assert shown["template"] == "{{ .Prompt }} {{ .Tools }}" and shown["system"] == "be brief"
    assert shown["parameters"].splitlines() == ['stop                           "x"',
                                                "temperature                    0.5"]
    assert shown["capabilities"] == ["completion", "tools"]
    assert shown["details"]["parameter_size"] == "208"
    assert shown["model_info"]["general.architecture"] == "llama"
    assert shown["messages"] == [{"role": "user", "content": "hi"}]
    assert f"FROM {m.model_path}\n" in shown["modelfile"] and "# FROM tiny:latest" in shown["modelfile"]
    assert await store.check() == []


async def test_create_from_model_overrides_and_inherits(store_and_model: tuple[ModelStore, BlobDigest]) -> None:
    store, digest = store_and_model
    await collect(store.create("base", {"files": {"m.gguf": digest}, "parameters": {"top_k": 10},
                                        "template": "A {{ .Suffix }}"}))
    statuses = await collect(store.create("derived", {"from": "base", "parameters": {"temperature": 0.1}}))
    assert statuses[0].startswith("using existing layer sha256:")
    m = await store.resolve("derived")
    assert m.params == {"top_k": 10, "temperature": 0.1}
    assert m.template == "A {{ .Suffix }}" and m.details.parent_model == "base:latest"
    assert (await store.show("derived"))["capabilities"] == ["completion", "insert"]


async def test_legacy_modelfile(store_and_model: tuple[ModelStore, BlobDigest]) -> None:
    store, digest = store_and_model
    mf = f"FROM @{digest}\nPARAMETER num_ctx 1024\nSYSTEM \"\"\"multi\nline\"\"\"\n"
    assert (await collect(store.create("legacy", {"modelfile": mf})))[-1] == "success"
    m = await store.resolve("legacy")
    assert m.params == {"num_ctx": 1024} and m.system == "multi\nline"
    await collect(store.create("legacy2", {"modelfile": "FROM legacy\nSYSTEM other"}))
    assert (await store.resolve("legacy2")).system == "other"


@pytest.mark.parametrize(
    ("request_body", "error", "fragment"),
    [
        ({"modelfile": "FROM ./model.gguf"}, InvalidRequest, "upload it with POST /api/blobs"),
        ({"modelfile": "FROM /etc/passwd"}, InvalidRequest, "does not read files by path"),
        ({"from": "../../etc"}, InvalidRequest, "does not read files by path"),
        ({"files": {"m.gguf": "sha256:" + "0" * 64}}, InvalidRequest, "not found: upload it"),
        ({"files": {"../m.gguf": "sha256:" + "0" * 64}}, InvalidRequest, "must be relative"),
        ({"files": {"m.gguf": "md5:abc"}}, InvalidRequest, "invalid digest"),
        ({}, InvalidRequest, "neither 'from' or 'files'"),
        ({"from": "nothere"}, ModelNotFound, "model 'nothere:latest' not found"),
        ({"from": "x", "quantize": "q4_K_M"}, InvalidRequest, "quantization is not supported"),
        ({"modelfile": "FROM x\nBOGUS y"}, InvalidRequest, "line 2"),
        ({"from": "x", "parameters": {"nope": 1}}, InvalidRequest, "unknown parameter"),
        ({"from": "x", "files": {"a.gguf": "sha256:" + "0" * 64}}, InvalidRequest, "not both"),
        ({"from": 5}, InvalidRequest, "invalid create request"),
    ],
)
async def test_create_rejects(tmp_path: Path, request_body: dict[str, object], error: type[Exception],
                              fragment: str) -> None:
    store = ModelStore(tmp_path, chunk_size=CS)
    with pytest.raises(error, match=fragment):
        await anext(store.create("m", request_body))
    assert await store.list_models() == []


async def test_create_rejects_non_gguf_and_bad_name(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "s", chunk_size=CS)
    other = tmp_path / "x.bin"
    other.write_bytes(os.urandom(100))
    digest = await upload(store, other)
    with pytest.raises(InvalidRequest, match="not in GGUF format"):
        await anext(store.create("m", {"files": {"x.bin": digest}}))
    with pytest.raises(InvalidModelName):
        await anext(store.create("../evil", {"files": {"x.bin": digest}}))


async def test_copy_delete_and_gc(store_and_model: tuple[ModelStore, BlobDigest]) -> None:
    store, digest = store_and_model
    await collect(store.create("a", {"files": {"m.gguf": digest}, "system": "A"}))
    await store.copy("a", "team/b:v1")
    entries = {e.name: e for e in await store.list_models()}
    assert set(entries) == {"a:latest", "team/b:v1"}
    assert entries["a:latest"].digest == entries["team/b:v1"].digest
    with pytest.raises(ModelNotFound, match="model 'zzz' not found"):
        await store.copy("zzz", "c")

    assert await store.delete("a") == []  # everything still referenced by team/b:v1
    assert [e.name for e in await store.list_models()] == ["team/b:v1"]
    removed = await store.delete("team/b:v1")
    assert digest in removed and len(removed) == 3  # model, system, config
    assert store.blobs.digests() == []
    assert not (store.root / "manifests" / "registry.ollama.ai").exists()
    with pytest.raises(ModelNotFound):
        await store.delete("a")

    # gc: unreferenced blobs go only after the grace period.
    info = store.blobs.write_bytes(b"orphan")
    assert await store.gc() == []
    assert await store.gc(grace_seconds=0) == [info.digest]
    assert await store.check() == []


async def test_case_insensitive_create_reuses_spelling(store_and_model: tuple[ModelStore, BlobDigest]) -> None:
    store, digest = store_and_model
    await collect(store.create("Mixed:Case", {"files": {"m.gguf": digest}}))
    await collect(store.create("mixed:case", {"files": {"m.gguf": digest}, "system": "x"}))
    [entry] = await store.list_models()
    assert entry.name == "Mixed:Case"
    assert (await store.resolve("MIXED:CASE")).system == "x"


async def test_extra_root_read_only(tmp_path: Path) -> None:
    ollama = ModelStore(tmp_path / "ollama", chunk_size=CS)
    digest = await upload(ollama, write_gguf(tmp_path / "m.gguf"))
    await collect(ollama.create("shared", {"files": {"m.gguf": digest}}))
    store = ModelStore(tmp_path / "omx", chunk_size=CS, extra_roots=[tmp_path / "ollama"])
    [entry] = await store.list_models()
    assert entry.read_only and entry.name == "shared:latest"
    assert (await store.resolve("shared")).model_path.is_relative_to(tmp_path / "ollama")
    with pytest.raises(Forbidden):
        await store.delete("shared")
    await store.copy("shared", "mine")  # a manifest in the writable root, blobs stay where they are
    assert (await store.resolve("mine")).model_digest == digest
    assert await store.delete("mine") == []
    assert (tmp_path / "ollama" / "blobs" / ("sha256-" + digest[7:])).exists()
    assert await store.gc(grace_seconds=0) == []


async def test_check_reports_damage(store_and_model: tuple[ModelStore, BlobDigest]) -> None:
    store, digest = store_and_model
    await collect(store.create("m", {"files": {"m.gguf": digest}, "template": "T"}))
    manifest = (await store.resolve("m")).manifest
    template = manifest.first(MEDIA_TEMPLATE)
    assert template is not None and manifest.first(MEDIA_PARAMS) is None
    store.blobs.own_path(template.digest).unlink()
    store.blobs.index_path(digest).unlink()
    (store.root / "blobs" / "stray.txt").write_text("x")
    problems = await store.check()
    assert any("is missing" in p for p in problems)
    assert any("no valid chunk index" in p for p in problems)
    assert any("unexpected file" in p for p in problems)
    with pytest.raises(IntegrityError, match="incomplete"):
        await store.resolve("m")
    assert not any("does not match" in p for p in await store.check(deep=True))
    config = store.blobs.own_path(manifest.config.digest)
    data = bytearray(config.read_bytes())
    data[0] ^= 1
    config.write_bytes(bytes(data))
    assert any(f"blob {manifest.config.digest} does not match" in p for p in await store.check(deep=True))
    assert manifest.first(MEDIA_MODEL) is not None


async def test_recover_removes_crash_leftovers(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, chunk_size=CS)
    dead_tmp = tmp_path / "tmp" / "blob.999999999.abcdef.tmp"
    dead_tmp.write_bytes(b"half")
    own_tmp = tmp_path / "tmp" / f"blob.{os.getpid()}.abcdef.tmp"
    own_tmp.write_bytes(b"in progress")
    orphan_index = tmp_path / "chunks" / ("sha256-" + "9" * 64 + ".json")
    orphan_index.write_text("{}")
    os.utime(orphan_index, (0, 0))
    fresh_index = tmp_path / "chunks" / ("sha256-" + "8" * 64 + ".json")
    fresh_index.write_text("{}")
    assert any("stale temp file" in p for p in store.check_sync())
    reopened = ModelStore(tmp_path, chunk_size=CS)
    assert dead_tmp.exists()  # opening touches nothing: a node recovers once, when it starts
    done = reopened.recover() + store.recover()
    assert not dead_tmp.exists() and own_tmp.exists()
    assert not orphan_index.exists() and fresh_index.exists()  # a writer may be about to publish its blob
    assert json.loads(fresh_index.read_text()) == {}
    assert isinstance(done, list)


def test_recover_removes_the_state_of_a_partial_blob_already_published(tmp_path: Path) -> None:
    """A writer killed between publishing a finished partial blob and removing its state leaves the
    state alone (the data file was renamed into blobs/): recover removes it at once, whatever its age."""
    from omx.storage import PartialBlob, parse_digest

    store = ModelStore(tmp_path, chunk_size=CS)
    data = os.urandom(2 * CS + 3)
    part = PartialBlob.open(store.blobs, parse_digest("sha256:" + hashlib.sha256(data).hexdigest()), len(data))
    for i in part.missing():
        off, n = part.chunk_range(i)
        part.write_chunk(i, data[off:off + n])
    state = part.state_path.read_bytes()
    part.finish()
    part.state_path.write_bytes(state)  # the kill came after the rename, before the clean-up
    other = tmp_path / "partial" / ("sha256-" + "7" * 64 + ".state.json")
    other.write_text("{}")  # a fresh state of a blob still being fetched stays
    assert any("removed orphan partial file" in d for d in store.recover())
    assert not part.state_path.exists() and other.exists()
    assert store.check_sync(deep=True) == []
