"""A receiving node's replication work in one process, for the replication crash-point test.

Run as ``python -m tests.support.replication_crash_child ROOT OP PEER_ID PEER_API PEER_TRANSFER MODEL...``
with the cluster secret (hex) in ``OMX_CLUSTER_SECRET``. It builds what a node's replicator uses
(the store, ``holdings.json``, the real HTTP peer transport and transfer driver, the real
:class:`~omx.runtime.replication.replicator.Replicator` and
:class:`~omx.runtime.replication.operations.ReplicationService`) around a small cluster link that
sees this store and one live peer (its inventory fetched over the signed peer API), then runs OP:

``transfer MODEL``         reconcile's fetch of a replica (``Replicator.start_fetch``, origin ``replica``);
``migrate MODEL KEEP``     both halves of a migration: fetch MODEL as its target (origin ``user``), then,
                           as the source of KEEP, drop the copy here once the peer (the keeper) holds it;
``repair``                 ``ReplicationService.verify()`` of every blob (a rotten chunk is marked, the
                           blob moved aside and its bad chunks fetched again), then what a restarted
                           node's reconcile does: fetch again every model whose blobs are not all here.

Running OP again after a kill is the restart: it must finish the work (resuming partial blobs).
With ``OMX_CRASH_AT=N`` the process SIGKILLs itself at the N-th call of ``os.fsync``,
``os.replace``, ``os.rename`` or ``os.link`` made by OP (the points where a write becomes
durable or visible); without it, it prints ``points N``: how many such calls OP made.
Transfers run one chunk at a time and record chunks every two chunks, so the points are
the same on every run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from omx.functions.cluster_view import NodeRecord
from omx.mesh import ClusterSecret, sign
from omx.runtime.peer import HttpPeerTransport, Transfers, TransferSettings
from omx.runtime.replication.link import PeerCommands
from omx.runtime.replication.operations import ReplicationService
from omx.runtime.replication.replicator import ReplicationSettings, Replicator
from omx.storage import ModelStore
from omx.storage.holdings import Holdings
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.holdings_scan import read_holdings
from omx.storage.holdings_wire import holdings_from_json
from omx.storage.placement import ClusterSnapshot, NodeView
from omx.types import NodeId

CS = 64 * 1024
SELF = "omx-crashchild"
_armed = False
_calls = 0
_crash_at = int(os.environ.get("OMX_CRASH_AT", "0"))


def _wrap(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _calls
        if _armed:
            _calls += 1
            if _calls == _crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


for _name in ("fsync", "replace", "rename", "link"):
    setattr(os, _name, _wrap(getattr(os, _name)))


class Link:
    """The replicator's view of a two-member cluster: this store and one live peer."""

    def __init__(self, store: ModelStore, meta: HoldingsMeta, peer: str, api: str, key: bytes) -> None:
        self.node_id = SELF
        self.store, self.meta, self.peer, self.api, self.key = store, meta, peer, api, key
        self.peer_holdings: Holdings | None = None

    def cluster_snapshot(self) -> ClusterSnapshot:
        own = read_holdings(self.store, self.meta.state())
        return ClusterSnapshot.of([NodeView(NodeId(SELF), True, own),
                                   NodeView(NodeId(self.peer), True, self.peer_holdings)])

    def members(self) -> list[NodeRecord]:
        return []

    async def publish_inventory(self) -> None:
        return None

    async def refresh_peer(self, node: str) -> None:
        path = "/api/peer/inventory"
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"http://{self.api}{path}", headers=sign(self.key, SELF, "GET", path))
        response.raise_for_status()
        self.peer_holdings = holdings_from_json(response.json())

    def api_of(self, node: str) -> str | None:
        return self.api if node == self.peer else None


async def main(root: Path, op: str, peer: str, api: str, transfer: str, models: list[str]) -> int:
    global _armed
    key = ClusterSecret.from_text(os.environ["OMX_CLUSTER_SECRET"]).peer_auth_key()
    store = ModelStore(root, chunk_size=CS)
    meta = HoldingsMeta(root)
    transport = HttpPeerTransport(SELF, lambda: key, {peer: transfer}.get, timeout=30.0)
    transfers = Transfers(store.blobs, transport, settings=TransferSettings(
        concurrency=1, sync_bytes=2 * CS, sync_interval=1e9))
    link = Link(store, meta, peer, api, key)
    await link.refresh_peer(peer)
    replicator = Replicator(node_id=SELF, store=store, meta=meta, link=link, transfers=transfers,
                            commands=PeerCommands(SELF, lambda: key, link.api_of),
                            settings=ReplicationSettings())
    service = ReplicationService(replicator)

    async def fetch(model: str, origin: Any) -> None:
        held = link.peer_holdings.model(model) if link.peer_holdings is not None else None
        assert held is not None, f"the peer does not hold {model}"
        await replicator.wait_fetch(replicator.start_fetch(model, held.digest, origin, [peer]))

    _armed = True
    try:
        if op == "transfer":
            await fetch(models[0], "replica")
        elif op == "migrate":
            await fetch(models[0], "user")
            keep = link.peer_holdings.model(models[1]) if link.peer_holdings is not None else None
            assert keep is not None
            if any(e.name == keep.name for e in await store.list_models()):
                await service._drop_own(keep.name, keep.digest, peer)
        elif op == "repair":
            report = await service.verify(None)
            assert report.unrepaired == 0, report
            for entry in await store.list_models():
                if not all(store.blobs.has(d) for d in (await asyncio.to_thread(
                        store._read_manifest, store._find(entry.name)[1]))[0].blobs):
                    await fetch(entry.name, "replica")
        else:
            raise SystemExit(f"unknown operation {op}")
    finally:
        _armed = False
        await transfers.aclose()
        await transport.aclose()
        await replicator.commands.aclose()
    return _calls


if __name__ == "__main__":
    root_arg, op_arg, peer_arg, api_arg, transfer_arg, *model_args = sys.argv[1:]
    points = asyncio.run(main(Path(root_arg), op_arg, peer_arg, api_arg, transfer_arg, model_args))
    print("points", points, flush=True)
