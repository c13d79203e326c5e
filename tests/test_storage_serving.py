"""Store-side parts of chunk transfer: damage markers, partial-blob peeks, local chunk lookup, serving."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from omx.errors import BlobNotFound, IntegrityError, InvalidRequest, NotFound
from omx.storage import BlobStore, PartialBlob
from omx.storage.chunk_serving import served_blob
from omx.storage.damaged import clear_damaged, damaged_blobs, is_damaged, mark_damaged, read_damage
from omx.storage.local_chunks import LocalChunks, local_chunk_map
from omx.storage.partial import read_partial_state

CHUNK = 64 * 1024


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store", chunk_size=CHUNK)


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_damage_markers_are_set_read_listed_and_cleared(blobs: BlobStore) -> None:
    info = blobs.write_bytes(_data(1, 100))
    assert not is_damaged(blobs, info.digest) and read_damage(blobs, info.digest) is None
    mark_damaged(blobs, info.digest, "chunk 0 does not match", [0, 0])
    damage = read_damage(blobs, info.digest)
    assert damage is not None and damage.chunks == (0,) and damage.reason == "chunk 0 does not match"
    assert damaged_blobs(blobs) == [info.digest] and is_damaged(blobs, info.digest)
    (blobs.root / "damaged" / "junk").write_text("x")  # ignored
    assert clear_damaged(blobs, info.digest) and not clear_damaged(blobs, info.digest)
    assert damaged_blobs(blobs) == []


def test_an_unreadable_marker_still_counts_as_damage(blobs: BlobStore) -> None:
    info = blobs.write_bytes(b"abc")
    mark_damaged(blobs, info.digest, "x")
    (blobs.root / "damaged" / ("sha256-" + info.digest[7:])).write_text("{not json")
    damage = read_damage(blobs, info.digest)
    assert damage is not None and damage.reason == "unreadable damage marker"


def test_a_partial_blob_can_be_looked_at_without_being_changed(blobs: BlobStore) -> None:
    data = _data(2, 3 * CHUNK + 1)
    idx = blobs.write_bytes(data).index
    assert idx is not None
    other = BlobStore(blobs.root.parent / "other", chunk_size=CHUNK)
    assert read_partial_state(other, idx.blob) is None
    part = PartialBlob.open(other, idx.blob, idx.size, index=idx)
    part.write_chunk(3, data[3 * CHUNK:])
    before = part.state_path.read_bytes()
    state = read_partial_state(other, idx.blob)
    assert state is not None and state.held() == [3] and state.chunks == idx.chunks
    assert state.has_chunk(3) and not state.has_chunk(0) and not state.has_chunk(99)
    assert part.state_path.read_bytes() == before
    part.state_path.write_text('{"digest": "' + idx.blob + '", "size": 5}')  # torn or foreign: ignored
    assert read_partial_state(other, idx.blob) is None


def test_served_blob_spans_complete_and_partial_blobs(blobs: BlobStore) -> None:
    data = _data(3, 4 * CHUNK + 10)
    idx = blobs.write_bytes(data).index
    assert idx is not None
    served = served_blob(blobs, idx.blob)
    assert served.complete and served.span(0, 5) == (0, len(data)) and served.span(4, 1) == (4 * CHUNK, 10)
    for start, count, status in ((5, 1, 416), (0, 6, 416), (0, 0, 400), (-1, 1, 416)):
        with pytest.raises(InvalidRequest) as err:
            served.span(start, count)
        assert err.value.status == status
    other = BlobStore(blobs.root.parent / "other", chunk_size=CHUNK)
    with pytest.raises(BlobNotFound):
        served_blob(other, idx.blob)
    part = PartialBlob.open(other, idx.blob, idx.size, chunk_size=CHUNK)  # a pull: no index known yet
    part.write_chunk(1, data[CHUNK:2 * CHUNK])
    partial = served_blob(other, idx.blob)
    assert not partial.complete and partial.index is None and partial.span(1, 1) == (CHUNK, CHUNK)
    assert partial.describe()["chunks_held"] == 1 and partial.describe()["index"] is None
    with pytest.raises(InvalidRequest):
        partial.span(0, 2)


def test_a_blob_whose_bytes_do_not_match_its_name_is_marked_and_not_served(blobs: BlobStore) -> None:
    info = blobs.write_bytes(_data(4, 2 * CHUNK))
    blobs.index_path(info.digest).unlink()  # no index yet: serving builds it, and finds the rot
    path = blobs.path(info.digest)
    raw = bytearray(path.read_bytes())
    raw[5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobNotFound, match="damaged"):
        served_blob(blobs, info.digest)
    assert is_damaged(blobs, info.digest)


async def test_local_chunks_are_found_by_digest_and_verified_reads_detect_rot(blobs: BlobStore) -> None:
    shared = _data(5, 2 * CHUNK)
    first = blobs.write_bytes(shared + _data(6, CHUNK))
    target = blobs.write_bytes(_data(7, CHUNK) + shared)  # the same two chunks, at other offsets
    assert first.index is not None and target.index is not None
    damaged = blobs.write_bytes(_data(8, CHUNK))
    mark_damaged(blobs, damaged.digest, "rot")
    chunks = local_chunk_map(blobs, exclude=[target.digest])
    assert damaged.index is not None and damaged.index.chunks[0] not in chunks
    source = LocalChunks(chunks)
    assert source.holds(target.index) == {1, 2}
    got = await source.read_chunk(target.digest, target.index.chunks[2], 2 * CHUNK, CHUNK)
    assert got == shared[CHUNK:]
    with pytest.raises(NotFound):
        await source.read_chunk(target.digest, target.index.chunks[0], 0, CHUNK)
    await asyncio.to_thread(blobs.path(first.digest).write_bytes, shared[:CHUNK])  # truncated under us
    with pytest.raises(IntegrityError):
        await source.read_chunk(target.digest, target.index.chunks[2], 2 * CHUNK, CHUNK)
    await asyncio.to_thread(blobs.path(first.digest).unlink)
    with pytest.raises(NotFound):
        await source.read_chunk(target.digest, target.index.chunks[1], CHUNK, CHUNK)


def test_chunks_written_without_fsync_are_claimed_only_after_sync(blobs: BlobStore) -> None:
    data = _data(9, 3 * CHUNK)
    idx = blobs.write_bytes(data).index
    assert idx is not None
    other = BlobStore(blobs.root.parent / "other", chunk_size=CHUNK)
    part = PartialBlob.open(other, idx.blob, idx.size, index=idx)
    part.write_chunk(0, data[:CHUNK], durable=False)
    part.write_chunk(1, data[CHUNK:2 * CHUNK], durable=False)
    assert part.has_chunk(0) and part.read_chunk(1) == data[CHUNK:2 * CHUNK]
    state = read_partial_state(other, idx.blob)
    assert state is not None and state.held() == []  # the bitmap on disk claims nothing yet
    # A crash now: a fresh open sees only what the bitmap claims.
    assert PartialBlob.open(other, idx.blob, idx.size, index=idx).held() == []
    part.write_chunk(0, data[:CHUNK], durable=False)
    assert part.sync() == 2 and part.sync() == 0
    state = read_partial_state(other, idx.blob)
    assert state is not None and state.held() == [0, 1]
    part.write_chunk(2, data[2 * CHUNK:], durable=False)
    info = part.finish_with_index(idx)  # records and flushes the last chunk before publishing
    assert info.path.read_bytes() == data
