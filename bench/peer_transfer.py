"""Peer-to-peer transfer and BLAKE3 indexing throughput, each against its baseline, in one run.

Transfer: one ``omx start`` node (standalone, its own home) holds a random blob;
this process fetches it with the real transfer driver and transport
(:class:`~omx.runtime.peer.Transfers`: chunk requests in parallel, BLAKE3 check of
every chunk, pwrite, batched fsync, the sha256 computed in order, publish) into a
fresh store, from

* the node's transfer listener (``sendfile``), and
* the node's API port (Hypercorn, the file range sent in pieces),

noting the serving node's CPU seconds per GiB sent by each path. The baseline is
``curl`` downloading the same file from ``python -m http.server`` to the same
filesystem, then ``fsync``: a store must flush a blob before it publishes it, so
that is the like-for-like baseline (curl without the flush, a plain write + fsync
(the disk's ceiling), and httpx and omx's own client reading the file into memory
are printed beside it).

Indexing: :func:`omx.storage.chunks.index_file` (sha256 of the blob and BLAKE3 of
every chunk, one pass) and BLAKE3 alone per chunk (from disk, and in memory: what
each received chunk costs), against ``b3sum`` (one thread and all threads) where it
is installed.

Contenders run in interleaved rounds and the best of ``--repeat`` counts for each
(the machine may be shared). Figures are printed, never asserted.

Run: ``python bench/peer_transfer.py [--mib 512] [--chunk-mib 8] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from _node import start_node
from blake3 import blake3

from omx.mesh import ClusterSecret
from omx.runtime.peer import HttpPeerTransport, Transfers, TransferSettings
from omx.runtime.peer.wire import WireClient
from omx.storage import BlobStore
from omx.storage.chunks import index_file
from omx.types import NodeId


def _start_node(home: Path, chunk: int) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    return start_node(home, {"OMX_WEB__ENABLED": "false", "OMX_MODELS__CHUNK_SIZE": str(chunk)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fetch_once(work: Path, key: bytes, address: str, digest: str, size: int, chunk: int, concurrency: int) -> float:
    root = work / "receiver"
    shutil.rmtree(root, ignore_errors=True)
    blobs = BlobStore(root, chunk_size=chunk)

    async def run() -> float:
        transport = HttpPeerTransport("omx-bench", lambda: key, {"seed": address}.get, timeout=120)
        transfers = Transfers(blobs, transport, settings=TransferSettings(concurrency=concurrency),
                              copy_local_chunks=False)
        try:
            started = time.perf_counter()
            await transfers.fetch_from_peers(digest, size, [NodeId("seed")])  # type: ignore[arg-type]
            return time.perf_counter() - started
        finally:
            await transport.aclose()

    seconds = asyncio.run(run())
    assert blobs.has(digest), "the transfer did not publish the blob"  # type: ignore[arg-type]
    return seconds / size


def _curl_once(url: str, dest: Path, size: int, *, durable: bool) -> float:
    """curl to a file; ``durable`` adds the fsync a store needs before it may call the file its blob."""
    dest.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(["curl", "-s", "-o", str(dest), url], check=True)
    if durable:
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started
    assert dest.stat().st_size == size
    return seconds / size


def _disk_once(path: Path, size: int) -> float:
    """Writing ``size`` bytes and fsyncing them: the ceiling of any durable download here."""
    piece = os.urandom(8 << 20)
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(size // len(piece)):
            os.write(fd, piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    return (time.perf_counter() - started) / size


def _httpx_once(url: str, size: int) -> float:
    started = time.perf_counter()
    buf = bytearray()
    with httpx.stream("GET", url, timeout=120) as r:
        for piece in r.iter_raw():
            buf += piece
    assert len(buf) == size
    return (time.perf_counter() - started) / size


def _wire_once(url: str, size: int) -> float:
    """The same GET with omx's peer client (:class:`~omx.runtime.peer.wire.WireClient`), into memory."""
    address, _, path = url.removeprefix("http://").partition("/")

    async def run() -> float:
        client = WireClient()
        try:
            started = time.perf_counter()
            response = await client.get(address, "/" + path, {}, max_body=size, timeout=120)
            assert len(response.body) == size
            return time.perf_counter() - started
        finally:
            await client.aclose()

    return asyncio.run(run()) / size


def _blake3_chunks_once(path: Path, chunk: int, size: int) -> float:
    buf = bytearray(chunk)
    view = memoryview(buf)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            blake3(view[:n]).digest()
    return (time.perf_counter() - started) / size


def _timed(fn: Callable[[], object], size: int) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) / size


def _b3sum_once(path: Path, threads: int | None, size: int) -> float:
    cmd = ["b3sum", *(["--num-threads", str(threads)] if threads else []), str(path)]
    return _timed(lambda: subprocess.run(cmd, capture_output=True, check=True), size)


def _mb(rate: float) -> str:
    return f"{rate / 1e6:8.0f} MB/s"


def _rounds(repeat: int, contenders: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Best throughput of each contender; rounds interleave them, so a busy moment hits all alike."""
    best = dict.fromkeys(contenders, 0.0)
    for _ in range(repeat):
        for name, once in contenders.items():
            best[name] = max(best[name], 1 / once())
    return best


def _blake3_in_memory_once(data: memoryview, chunk: int) -> float:
    started = time.perf_counter()
    for off in range(0, len(data), chunk):
        blake3(data[off:off + chunk]).digest()
    return (time.perf_counter() - started) / len(data)


def _serve_static(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/blob.bin"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.head(url, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the static file server did not start")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), measure and print (bench/replication.py calls it too)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="blob size in MiB")
    ap.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=3, help="chunks in flight (models.concurrency)")
    args = ap.parse_args(argv)
    size, chunk = args.mib << 20, int(args.chunk_mib * (1 << 20))
    work = Path(tempfile.mkdtemp(prefix="omx-bench-transfer-"))
    node = static = None
    try:
        blob = work / "www" / "blob.bin"
        blob.parent.mkdir()
        with open(blob, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        data = memoryview(blob.read_bytes())
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        print(f"blob {args.mib} MiB, chunks {args.chunk_mib} MiB, concurrency {args.concurrency}, "
              f"best of {args.repeat} interleaved rounds, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")

        # ---- indexing
        hashing: dict[str, Callable[[], float]] = {
            "index_file: sha256 + BLAKE3 per chunk, from disk": lambda: _timed(lambda: index_file(blob, chunk), size),
            "BLAKE3 per chunk, one thread, from disk": lambda: _blake3_chunks_once(blob, chunk, size),
            "BLAKE3 per chunk, one thread, in memory": lambda: _blake3_in_memory_once(data, chunk),
        }
        if shutil.which("b3sum"):
            hashing["b3sum --num-threads 1"] = lambda: _b3sum_once(blob, 1, size)
            hashing["b3sum, all threads"] = lambda: _b3sum_once(blob, None, size)
        h = _rounds(args.repeat, hashing)
        for name, rate in h.items():
            print(f"{name:52s} {_mb(rate)}")
        base_name = "b3sum --num-threads 1" if "b3sum --num-threads 1" in h else \
            "BLAKE3 per chunk, one thread, from disk"
        for name in [n for n in h if not n.startswith("b3sum")]:
            print(f"ratio {name} / {base_name}: {h[name] / h[base_name]:.2f}")

        # ---- transfer
        node, info = _start_node(work / "home", chunk)
        api = str(info["url"]).removeprefix("http://")
        transfer = f"127.0.0.1:{info['transfer_port']}"
        with httpx.Client(base_url=str(info["url"]), timeout=600) as c, open(blob, "rb") as f:
            c.post(f"/api/blobs/{digest}", content=f).raise_for_status()
        key = ClusterSecret.from_text((work / "home" / "cluster" / "secret").read_bytes().hex()).peer_auth_key()
        static, url = _serve_static(blob.parent)
        server = psutil.Process(node.pid)
        server_cpu: dict[str, float] = {}

        def serving(name: str, address: str) -> Callable[[], float]:
            """A peer fetch from ``address``, noting the node's CPU seconds per GiB it served."""

            def once() -> float:
                before = sum(server.cpu_times()[:2])
                per_byte = _fetch_once(work, key, address, digest, size, chunk, args.concurrency)
                used = (sum(server.cpu_times()[:2]) - before) / size * (1 << 30)
                server_cpu[name] = min(server_cpu.get(name, used), used)
                return per_byte

            return once

        moving: dict[str, Callable[[], float]] = {
            "write + fsync of a file that size (the disk's ceiling)": lambda: _disk_once(work / "disk.bin", size),
            "curl from python -m http.server, then fsync": lambda: _curl_once(url, work / "c.bin", size, durable=True),
            "curl from python -m http.server, no fsync": lambda: _curl_once(url, work / "c.bin", size, durable=False),
            "omx peer fetch, transfer listener (sendfile)": serving("transfer listener (sendfile)", transfer),
            "omx peer fetch, API port (Hypercorn, pieces)": serving("API port (Hypercorn, pieces)", api),
            "httpx GET of the whole file into memory": lambda: _httpx_once(url, size),
            "omx wire client GET of the whole file into memory": lambda: _wire_once(url, size),
        }
        m = _rounds(args.repeat, moving)
        for name, rate in m.items():
            print(f"{name:52s} {_mb(rate)}")
        curl = m["curl from python -m http.server, then fsync"]
        curl_cache = m["curl from python -m http.server, no fsync"]
        for name, cpu in server_cpu.items():
            print(f"serving node CPU per GiB sent, {name:30s} {cpu:6.2f} s")
        for name in ("omx peer fetch, transfer listener (sendfile)", "omx peer fetch, API port (Hypercorn, pieces)"):
            print(f"ratio {name} / curl + fsync: {m[name] / curl:.2f}   / curl without fsync: "
                  f"{m[name] / curl_cache:.2f}")
    finally:
        for proc in (static, node):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
