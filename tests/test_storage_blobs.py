from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from omx.errors import BlobNotFound, IntegrityError, InvalidDigest
from omx.storage import BlobStore, ChunkIndex, PartialBlob, index_file, parse_digest

CS = 64 * 1024


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def stream(data: bytes, piece: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


async def test_write_verifies_and_publishes_with_index(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    data = os.urandom(5 * CS + 3)
    info = await store.write(stream(data, 7777), expected=parse_digest(sha(data)))
    assert info.created and info.digest == sha(data) and info.size == len(data)
    assert info.path == tmp_path / "blobs" / ("sha256-" + sha(data)[7:])
    assert info.path.read_bytes() == data
    idx = ChunkIndex.from_json(store.index_path(info.digest).read_bytes())
    assert idx == info.index and idx.chunk_count == 6
    assert store.has(info.digest) and store.size(info.digest) == len(data)
    assert store.digests() == [info.digest]
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_write_large_pipelined(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=1 << 20)
    data = os.urandom(13 << 20)
    info = await store.write(stream(data, 1 << 20))
    assert info.digest == sha(data)
    assert info.index is not None and info.index == index_file(info.path, 1 << 20)


async def test_mismatch_removes_temp_and_raises(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    data = os.urandom(1000)
    wrong = parse_digest("sha256:" + "0" * 64)
    with pytest.raises(InvalidDigest, match=f"digest mismatch, expected {wrong}, got {sha(data)}"):
        await store.write(stream(data), expected=wrong)
    assert store.digests() == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "chunks").iterdir()) == []


async def test_write_is_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    data = os.urandom(3000)
    first = await store.write(stream(data), expected=parse_digest(sha(data)))
    mtime = first.path.stat().st_mtime_ns
    drained: list[int] = []

    async def counting() -> AsyncIterator[bytes]:
        async for piece in stream(data):
            drained.append(len(piece))
            yield piece

    again = await store.write(counting(), expected=parse_digest(sha(data)))
    assert not again.created and sum(drained) == len(data)
    assert first.path.stat().st_mtime_ns == mtime
    third = await store.write(stream(data))  # no expected digest: hashed, then found present
    assert not third.created and third.digest == first.digest


async def test_stream_error_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(5 << 20)
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        await store.write(broken())
    assert store.digests() == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_extra_roots_are_read_and_indexed_lazily(tmp_path: Path) -> None:
    extra = tmp_path / "ollama"
    (extra / "blobs").mkdir(parents=True)
    data = os.urandom(2 * CS + 5)
    digest = parse_digest(sha(data))
    (extra / "blobs" / ("sha256-" + digest[7:])).write_bytes(data)
    store = BlobStore(tmp_path / "omx", [extra], chunk_size=CS)
    assert store.has(digest) and not store.is_own(digest)
    assert store.path(digest).parent == extra / "blobs"
    idx = store.index(digest)
    assert idx.size == len(data) and store.index_path(digest).is_file()
    assert sorted(p.name for p in (extra / "blobs").iterdir()) == ["sha256-" + digest[7:]]
    assert not store.delete(digest)
    assert store.has(digest)
    assert store.digests() == [] and store.digests(include_extra=True) == [digest]


def test_index_detects_corrupt_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    digest = parse_digest("sha256:" + "1" * 64)
    store.own_path(digest).write_bytes(b"not what the name says")
    with pytest.raises(IntegrityError, match="corrupt"):
        store.index(digest)


def test_missing_and_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    digest = parse_digest("sha256:" + "2" * 64)
    with pytest.raises(BlobNotFound):
        store.path(digest)
    info = store.write_bytes(b"small")
    assert store.delete(info.digest) and not store.has(info.digest)
    assert not store.index_path(info.digest).exists()


# ---------------------------------------------------------------- partial blobs


def test_partial_resume_with_known_index(tmp_path: Path) -> None:
    source = BlobStore(tmp_path / "a", chunk_size=CS)
    data = os.urandom(4 * CS + 99)
    info = source.write_bytes(data)
    idx = source.index(info.digest)
    dest = BlobStore(tmp_path / "b", chunk_size=1 << 20)  # the source's chunk size wins

    part = PartialBlob.open(dest, info.digest, len(data), index=idx)
    assert part.chunk_size == CS and part.missing() == [0, 1, 2, 3, 4]
    for i in (3, 0):
        off, n = idx.chunk_range(i)
        part.write_chunk(i, data[off:off + n])
    with pytest.raises(IntegrityError, match="does not match"):
        part.write_chunk(1, os.urandom(CS))
    with pytest.raises(IntegrityError, match="bytes"):
        part.write_chunk(1, data[:10])
    assert not dest.has(info.digest)

    # A new process resumes from the persisted bitmap.
    again = PartialBlob.open(dest, info.digest, len(data), index=idx)
    assert again.missing() == [1, 2, 4] and again.held() == [0, 3]
    assert again.read_chunk(3) == data[3 * CS:4 * CS]
    with pytest.raises(IntegrityError, match="missing"):
        again.finish()
    for i in again.missing():
        off, n = idx.chunk_range(i)
        again.write_chunk(i, data[off:off + n])
    done = again.finish()
    assert done.path.read_bytes() == data and dest.has(info.digest)
    assert dest.stored_index(info.digest) == idx
    assert list((tmp_path / "b" / "partial").iterdir()) == []


def test_partial_without_index_verifies_at_finish(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    data = os.urandom(2 * CS + 1)
    digest = parse_digest(sha(data))
    part = PartialBlob.open(store, digest, len(data))
    part.write_chunk(0, data[:CS])
    part.write_chunk(1, os.urandom(CS))  # unverifiable until the end
    part.write_chunk(2, data[2 * CS:])
    with pytest.raises(IntegrityError, match="digest mismatch"):
        part.finish()
    assert not store.has(digest)
    part = PartialBlob.open(store, digest, len(data))
    assert part.missing() == [0, 1, 2]
    for i in range(3):
        part.write_chunk(i, data[i * CS:(i + 1) * CS])
    assert part.finish().digest == digest


def test_partial_state_of_other_size_restarts(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, chunk_size=CS)
    digest = parse_digest("sha256:" + "3" * 64)
    part = PartialBlob.open(store, digest, 3 * CS)
    part.write_chunk(0, os.urandom(CS))
    other = PartialBlob.open(store, digest, 2 * CS)
    assert other.missing() == [0, 1] and other.data_path.stat().st_size == 2 * CS


def test_a_repaired_blob_is_unmarked_before_it_becomes_visible(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between publishing a repaired blob and clearing its damage marker must not leave the
    good copy marked (a marked blob is never served): the marker goes first, while blobs/ has no copy."""
    import omx.storage.partial as partial_module
    from omx.storage.damaged import is_damaged, mark_damaged

    store = BlobStore(tmp_path / "store", chunk_size=CS)
    data = os.urandom(3 * CS + 5)
    digest = parse_digest(sha(data))
    rotten = tmp_path / "rotten"
    rotten.write_bytes(data)
    index = index_file(rotten, CS)
    rotten.write_bytes(b"\0" * CS + data[CS:])
    mark_damaged(store, digest, "verify: chunk hash mismatch", [0])
    part = PartialBlob.adopt(store, rotten, index, held={1, 2, 3})
    part.write_chunk(0, data[:CS])
    seen: list[bool] = []
    real = partial_module.publish

    def publish(tmp: Path, dest: Path) -> None:
        seen.append(is_damaged(store, digest))
        real(tmp, dest)

    monkeypatch.setattr(partial_module, "publish", publish)
    part.finish()
    assert seen == [False] and not is_damaged(store, digest)
    assert store.path(digest).read_bytes() == data
