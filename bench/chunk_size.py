"""Chunk-size benchmark for the BLAKE3 chunk index.

For each candidate chunk size it measures, on the same in-memory data:

* one-pass hashing throughput of :class:`omx.storage.chunks.BlobHasher`
  (sha256 of the blob + BLAKE3 of every chunk), fed in 4 MiB buffers;
* per-chunk verification throughput (``verify_chunk`` on every chunk, what a
  peer fetch does on arrival);
* the index size for a 4 GiB model (JSON bytes) and the chunk count.

Run: ``python bench/chunk_size.py [--mib 512]``. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

from blake3 import blake3

from omx.storage.chunks import BlobHasher, ChunkIndex, verify_chunk

SIZES_MIB = (1, 2, 4, 8, 16, 32)


def _bench(data: memoryview, chunk_size: int, feed: int) -> tuple[float, float, ChunkIndex]:
    t0 = time.perf_counter()
    with BlobHasher(chunk_size) as h:
        for off in range(0, len(data), feed):
            h.update(data[off:off + feed])
        idx = h.finish()
    t1 = time.perf_counter()
    for i, c in enumerate(idx.chunks):
        off, n = idx.chunk_range(i)
        assert verify_chunk(data[off:off + n], c)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512, help="data size in MiB")
    ap.add_argument("--feed-mib", type=int, default=4, help="buffer size fed to the hasher")
    args = ap.parse_args()
    data = memoryview(os.urandom(args.mib << 20))
    feed = args.feed_mib << 20
    print(f"data {args.mib} MiB, feed {args.feed_mib} MiB, cpus {os.cpu_count()}")
    for label, fn in (("sha256 alone", lambda: hashlib.sha256(data)), ("blake3 alone", lambda: blake3(data))):
        t0 = time.perf_counter()
        fn()
        print(f"{label}: {len(data) / 1e6 / (time.perf_counter() - t0):.0f} MB/s")
    with BlobHasher(8 << 20, parallel=False) as h:
        t0 = time.perf_counter()
        for off in range(0, len(data), feed):
            h.update(data[off:off + feed])
        h.finish()
        print(f"one pass, no helper thread (8 MiB chunks): {len(data) / 1e6 / (time.perf_counter() - t0):.0f} MB/s")
    print(f"{'chunk':>7} {'hash MB/s':>10} {'verify MB/s':>12} {'chunks/4GiB':>12} {'index/4GiB':>11}")
    for mib in SIZES_MIB:
        cs = mib << 20
        best_h, best_v = float("inf"), float("inf")
        for _ in range(3):
            th, tv, _idx = _bench(data, cs, feed)
            best_h, best_v = min(best_h, th), min(best_v, tv)
        n4 = (4 << 30) // cs
        index_bytes = 120 + n4 * 67
        mb = len(data) / 1e6
        print(f"{mib:>5}Mi {mb / best_h:>10.0f} {mb / best_v:>12.0f} {n4:>12} {index_bytes / 1024:>9.1f}Ki")


if __name__ == "__main__":
    main()
