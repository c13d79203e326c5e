"""A receiving process for the real-node transfer tests: fetches one blob from running nodes.

Run as ``python -m tests.support.peer_fetch_child ROOT DIGEST SIZE PEER=HOST:PORT...`` with the
cluster secret (hex) in ``OMX_CLUSTER_SECRET``. It builds the real transport, transfer driver
and Prometheus metrics a node uses, fetches the blob into the store at ROOT (resuming whatever
a killed earlier run left there), and prints one JSON line: the blob's sha256, the transfer's
per-source bytes and rejected chunks, and the replication metrics as rendered for ``/metrics``.
``OMX_REPLICATION__MAX_BANDWIDTH`` (bytes per second) slows it down, so a test can kill it
mid-transfer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from omx.mesh import ClusterSecret
from omx.runtime.cluster.metrics import NodeMetrics
from omx.runtime.peer import Bandwidth, HttpPeerTransport, Transfers, TransferSettings
from omx.storage import ModelStore, parse_digest
from omx.types import NodeId


async def main(root: Path, digest: str, size: int, peers: dict[str, str]) -> dict[str, object]:
    key = ClusterSecret.from_text(os.environ["OMX_CLUSTER_SECRET"]).peer_auth_key()
    store = ModelStore(root, chunk_size=64 * 1024)
    metrics = NodeMetrics(root)
    transport = HttpPeerTransport("omx-receiver", lambda: key, peers.get, timeout=30.0)
    rate = int(os.environ.get("OMX_REPLICATION__MAX_BANDWIDTH", "0"))
    transfers = Transfers(store.blobs, transport, settings=TransferSettings(concurrency=3),
                          bandwidth=Bandwidth(rate, burst=64 * 1024) if rate else None, observer=metrics)
    last: dict[str, object] = {}

    def progress(p: object) -> None:
        last["progress"] = p

    try:
        info = await transfers.fetch_from_peers(parse_digest(digest), size, [NodeId(p) for p in peers],
                                                on_progress=progress)
    finally:
        await transport.aclose()
    sha = "sha256:" + hashlib.sha256(info.path.read_bytes()).hexdigest()
    samples = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        if family.name.startswith("omx_replication"):
            for s in family.samples:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[s.name + (f"{{{label}}}" if label else "")] = s.value
    p = last.get("progress")
    return {"sha256": sha, "received": dict(getattr(p, "received", {})), "rejected": getattr(p, "rejected", 0),
            "metrics": samples}


if __name__ == "__main__":
    root_arg, digest_arg, size_arg, *peer_args = sys.argv[1:]
    peer_map = dict(arg.split("=", 1) for arg in peer_args)
    result = asyncio.run(main(Path(root_arg), digest_arg, int(size_arg), peer_map))
    print(json.dumps(result), flush=True)
