from __future__ import annotations

import hashlib
import os

import pytest
from blake3 import blake3

from omx.errors import IntegrityError
from omx.storage import BlobHasher, ChunkIndex, chunk_root, verify_chunk

CS = 64 * 1024


def _expected(data: bytes, cs: int) -> tuple[str, list[str], str]:
    chunks = [blake3(data[i:i + cs]).hexdigest() for i in range(0, len(data), cs)]
    root = blake3(b"".join(bytes.fromhex(c) for c in chunks)).hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest(), chunks, root


def test_known_values_of_empty_blob() -> None:
    with BlobHasher(CS) as h:
        idx = h.finish()
    assert idx.blob == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert idx.chunks == ()
    assert idx.root == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"  # BLAKE3("")


@pytest.mark.parametrize("size", [1, CS - 1, CS, CS + 1, 3 * CS, 5 * CS + 17])
def test_one_shot_matches_reference(size: int) -> None:
    data = os.urandom(size)
    with BlobHasher(CS) as h:
        h.update(data)
        idx = h.finish()
    blob, chunks, root = _expected(data, CS)
    assert idx.blob == blob and list(idx.chunks) == chunks and idx.root == root and idx.size == size


def test_incremental_odd_sizes_equal_one_shot() -> None:
    data = os.urandom(7 * CS + 12345)
    with BlobHasher(CS) as h:
        h.update(data)
        whole = h.finish()
    sizes = [1, 7, CS - 3, 5, 2 * CS + 1, 99991, 3 << 20]
    with BlobHasher(CS) as h:
        pos, k = 0, 0
        while pos < len(data):
            n = sizes[k % len(sizes)]
            h.update(memoryview(data)[pos:pos + n])
            pos, k = pos + n, k + 1
        parts = h.finish()
    assert parts == whole


def test_large_buffers_use_parallel_path_and_agree() -> None:
    data = os.urandom(3 << 20)
    with BlobHasher(CS, parallel=True) as a, BlobHasher(CS, parallel=False) as b:
        a.update(bytearray(data))
        b.update(data)
        assert a.finish() == b.finish()


def test_json_round_trip_and_ranges() -> None:
    data = os.urandom(2 * CS + 10)
    with BlobHasher(CS) as h:
        h.update(data)
        idx = h.finish()
    again = ChunkIndex.from_json(idx.to_json())
    assert again == idx
    assert idx.chunk_range(0) == (0, CS) and idx.chunk_range(2) == (2 * CS, 10)
    with pytest.raises(IndexError):
        idx.chunk_range(3)
    assert chunk_root(idx.chunks) == idx.root


def test_tampered_index_is_rejected() -> None:
    with BlobHasher(CS) as h:
        h.update(os.urandom(2 * CS))
        idx = h.finish()
    doc = idx.to_json().replace(idx.chunks[0].encode(), b"0" * 64)
    with pytest.raises(IntegrityError, match="root"):
        ChunkIndex.from_json(doc)
    with pytest.raises(IntegrityError):
        ChunkIndex.from_json(b"{not json")
    short = idx.to_json().replace(b'"size":131072', b'"size":300000')
    with pytest.raises(IntegrityError, match="chunks"):
        ChunkIndex.from_json(short)


def test_verify_chunk() -> None:
    data = b"hello chunk"
    assert verify_chunk(data, blake3(data).hexdigest())
    assert not verify_chunk(data + b"!", blake3(data).hexdigest())


def test_chunk_size_bounds() -> None:
    with pytest.raises(ValueError):
        BlobHasher(1000)
