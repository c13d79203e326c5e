"""Peer-to-peer transfer and BLAKE3 indexing throughput, each against its baseline, in one run.

Transfer: one ``omx start`` node (standalone, its own home) holds a random blob;
this process fetches it with the real transfer driver and transport
(:class:`~omx.runtime.peer.Transfers`: chunk requests in parallel, BLAKE3 check of
every chunk, pwrite + fsync, the sha256 computed in order, publish) into a fresh
store, from

* the node's transfer listener (``sendfile``), and
* the node's API port (Hypercorn, the file range sent in pieces),

against ``curl`` downloading the same file from ``python -m http.server`` to the
same filesystem. Indexing: :func:`omx.storage.chunks.index_file` (sha256 of the
blob and BLAKE3 of every chunk, one pass) and BLAKE3 alone per chunk (what each
received chunk costs), against ``b3sum`` (one thread and all threads) where it is
installed, and ``blake3`` in one thread otherwise. The best of ``--repeat`` runs
counts for every contender (the machine may be shared). Figures are printed,
never asserted.

Run: ``python bench/peer_transfer.py [--mib 512] [--chunk-mib 8] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
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
from blake3 import blake3

from omx.mesh import ClusterSecret
from omx.runtime.peer import HttpPeerTransport, Transfers, TransferSettings
from omx.storage import BlobStore
from omx.storage.chunks import index_file
from omx.types import NodeId


def _best(runs: int, once: Callable[[], float]) -> float:
    """Best throughput (bytes/s) of ``runs`` runs of ``once`` (which returns seconds)."""
    return max(1 / once() for _ in range(runs))


def _start_node(home: Path, chunk: int) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    env = {**os.environ, "OMX_HOME": str(home), "OMX_P2P__PORT": "0", "OMX_MODELS__CHUNK_SIZE": str(chunk)}
    proc = subprocess.Popen([sys.executable, "-c", "from omx.cli.main import main; main()", "start",
                             "--host", "127.0.0.1", "--api-port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    node_json = home / "run" / "node.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if node_json.exists():
            info = json.loads(node_json.read_text())
            if info.get("pid") == proc.pid:
                return proc, info
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the node did not start")


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


def _curl_once(url: str, dest: Path, size: int) -> float:
    dest.unlink(missing_ok=True)
    out = subprocess.run(["curl", "-s", "-o", str(dest), "-w", "%{time_total}", url], capture_output=True,
                         text=True, check=True)
    assert dest.stat().st_size == size
    return float(out.stdout) / size


def _httpx_once(url: str, size: int) -> float:
    started = time.perf_counter()
    buf = bytearray()
    with httpx.stream("GET", url, timeout=120) as r:
        for piece in r.iter_raw():
            buf += piece
    assert len(buf) == size
    return (time.perf_counter() - started) / size


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="blob size in MiB")
    ap.add_argument("--chunk-mib", type=float, default=8.0, help="chunk size in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=3, help="chunks in flight (models.concurrency)")
    args = ap.parse_args()
    size, chunk = args.mib << 20, int(args.chunk_mib * (1 << 20))
    work = Path(tempfile.mkdtemp(prefix="omx-bench-transfer-"))
    node = static = None
    try:
        blob = work / "www" / "blob.bin"
        blob.parent.mkdir()
        with open(blob, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        digest = "sha256:" + hashlib.file_digest(open(blob, "rb"), "sha256").hexdigest()  # noqa: SIM115
        print(f"blob {args.mib} MiB, chunks {args.chunk_mib} MiB, concurrency {args.concurrency}, "
              f"best of {args.repeat}, {os.cpu_count()} CPUs")

        # ---- indexing
        idx_rate = _best(args.repeat, lambda: _timed(lambda: index_file(blob, chunk), size))
        b3_chunks = _best(args.repeat, lambda: _blake3_chunks_once(blob, chunk, size))
        print(f"index_file (sha256 + BLAKE3 per chunk) {_mb(idx_rate)}")
        print(f"BLAKE3 per chunk, one thread           {_mb(b3_chunks)}")
        if shutil.which("b3sum"):
            b3_one = _best(args.repeat, lambda: _b3sum_once(blob, 1, size))
            b3_all = _best(args.repeat, lambda: _b3sum_once(blob, None, size))
            print(f"b3sum --num-threads 1                  {_mb(b3_one)}")
            print(f"b3sum (all threads)                    {_mb(b3_all)}")
            baseline, name = b3_one, "b3sum one thread"
        else:
            baseline, name = b3_chunks, "blake3 one thread (no b3sum installed)"
        print(f"ratio BLAKE3 per chunk / {name}: {b3_chunks / baseline:.2f}  (target >= 0.8)")
        print(f"ratio index_file / {name}: {idx_rate / baseline:.2f}  (includes the sha256 of the blob)")

        # ---- transfer
        node, info = _start_node(work / "home", chunk)
        api = str(info["url"]).removeprefix("http://")
        transfer = f"127.0.0.1:{info['transfer_port']}"
        with httpx.Client(base_url=str(info["url"]), timeout=600) as c, open(blob, "rb") as f:
            c.post(f"/api/blobs/{digest}", content=f).raise_for_status()
        key = ClusterSecret.from_text((work / "home" / "cluster" / "secret").read_bytes().hex()).peer_auth_key()
        port = _free_port()
        static = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                  cwd=blob.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.head(f"http://127.0.0.1:{port}/blob.bin", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/blob.bin"
        curl = _best(args.repeat, lambda: _curl_once(url, work / "curl.bin", size))
        peer_sendfile = _best(args.repeat, lambda: _fetch_once(work, key, transfer, digest, size, chunk,
                                                                   args.concurrency))
        peer_api = _best(args.repeat, lambda: _fetch_once(work, key, api, digest, size, chunk, args.concurrency))
        plain_httpx = _best(args.repeat, lambda: _httpx_once(url, size))
        print(f"curl from python -m http.server (to disk)     {_mb(curl)}")
        print(f"omx peer fetch from the transfer listener     {_mb(peer_sendfile)}")
        print(f"omx peer fetch from the API port (Hypercorn)  {_mb(peer_api)}")
        print(f"httpx GET of the whole file into memory       {_mb(plain_httpx)}  (the client omx does not use)")
        print(f"ratio peer fetch (transfer listener) / curl: {peer_sendfile / curl:.2f}  (target >= 0.5)")
        print(f"ratio peer fetch (API port) / curl: {peer_api / curl:.2f}")
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
