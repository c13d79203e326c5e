"""The node's blob transfers: at most one per digest, listed for status reports.

Two transfers of one blob in one store would share (and clobber) its partial
file, so :meth:`Transfers.fetch_blob` joins a transfer already under way for
the same digest (adding the new caller's sources to it) instead of starting a
second. A transfer runs while anyone waits for it: when every waiter is
cancelled it is cancelled too (its partial blob stays on disk and a later
transfer resumes it).

A swarm: :meth:`Transfers.fetch_from_peers` may be given peers that are still
fetching the same blob (or have not begun yet). While the transfer runs, every
peer that does not hold the whole blob is asked again, every ``watch_s``, what
it holds, and the transfer takes the chunks it got meanwhile from it. Peers
fetching one blob together each take a different share of its chunks first
(``spread``), so the peers that hold it all are asked for different chunks by
each, and they trade the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from omx.errors import NotFound, OmxError
from omx.protocols import PeerBlobState, PeerTransport
from omx.runtime.peer.bandwidth import Bandwidth
from omx.runtime.peer.fetch import (
    BlobTransfer,
    TransferObserver,
    TransferProgress,
    TransferSettings,
    availability_for,
    probe_sources,
)
from omx.storage import BlobInfo, BlobStore, ChunkIndex
from omx.storage.fetch_plan import AllChunks, Availability
from omx.storage.local_chunks import LocalChunks, local_chunk_map
from omx.types import BlobDigest, NodeId

__all__ = ["ProgressListener", "Transfers"]

ProgressListener = Callable[[TransferProgress], None]

log = logging.getLogger("omx.runtime.peer")

WATCH_S = 1.0
"""How often a transfer asks its swarm peers again what they hold (they record new chunks about as often)."""


@dataclass
class _Running:
    transfer: BlobTransfer
    task: asyncio.Task[BlobInfo]
    listeners: list[ProgressListener] = field(default_factory=list)
    waiters: int = 0


class Transfers:
    """Runs blob transfers into ``blobs`` from peers reached through ``transport``."""

    def __init__(self, blobs: BlobStore, transport: PeerTransport, *,
                 settings: TransferSettings = TransferSettings(),  # noqa: B008 - frozen
                 bandwidth: Bandwidth | None = None, observer: TransferObserver | None = None,
                 copy_local_chunks: bool = True) -> None:
        self.blobs = blobs
        self.transport = transport
        self.settings = settings
        self.bandwidth = bandwidth
        self.observer = observer
        self.copy_local_chunks = copy_local_chunks
        self._running: dict[BlobDigest, _Running] = {}

    def active(self) -> list[TransferProgress]:
        """Progress of every transfer under way."""
        return [r.transfer.progress for r in self._running.values()]

    def get(self, digest: BlobDigest) -> BlobTransfer | None:
        """The transfer of ``digest`` under way (to add or remove sources while it runs), if any."""
        running = self._running.get(digest)
        return running.transfer if running is not None else None

    async def fetch_blob(self, index: ChunkIndex, sources: Mapping[NodeId, Availability | Iterable[int]], *,
                         on_progress: ProgressListener | None = None, spread: tuple[int, int] = (0, 1)
                         ) -> BlobInfo:
        """Fetch the blob ``index`` describes from ``sources`` (peer -> chunks it holds, or ``ALL``).

        ``spread``: see :meth:`fetch_from_peers` (not applied when joining a transfer under way).
        """
        running = self._running.get(index.blob)
        if running is not None:
            for peer, chunks in sources.items():
                if peer not in running.transfer.plan.sources:
                    running.transfer.set_source(peer, chunks)
        else:
            local = None
            if self.copy_local_chunks:
                local = LocalChunks(await asyncio.to_thread(local_chunk_map, self.blobs, exclude=[index.blob]))
            running = self._running.get(index.blob)  # another caller may have started it meanwhile
            if running is None:
                running = self._start(index, sources, local)
                running.transfer.plan.share(*spread)
        if on_progress is not None:
            running.listeners.append(on_progress)
        running.waiters += 1
        try:
            return await asyncio.shield(running.task)
        except asyncio.CancelledError:
            running.waiters -= 1
            if running.waiters == 0:
                running.task.cancel()
            raise
        finally:
            if on_progress is not None and on_progress in running.listeners:
                running.listeners.remove(on_progress)

    def _start(self, index: ChunkIndex, sources: Mapping[NodeId, Availability | Iterable[int]],
               local: LocalChunks | None) -> _Running:
        holder: list[_Running] = []

        def fan_out(progress: TransferProgress) -> None:
            for listener in list(holder[0].listeners) if holder else ():
                listener(progress)

        transfer = BlobTransfer(self.blobs, index, self.transport, sources, local=local, settings=self.settings,
                                bandwidth=self.bandwidth, observer=self.observer, on_progress=fan_out)
        task = asyncio.create_task(transfer.run(), name=f"transfer-{index.blob[7:19]}")
        running = _Running(transfer, task)
        holder.append(running)
        self._running[index.blob] = running
        task.add_done_callback(lambda t: self._finished(index.blob, running, t))
        return running

    def _finished(self, digest: BlobDigest, running: _Running, task: asyncio.Task[BlobInfo]) -> None:
        if self._running.get(digest) is running:
            del self._running[digest]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it through the shield

    async def fetch_from_peers(self, digest: BlobDigest, size: int, peers: Iterable[NodeId], *,
                               on_progress: ProgressListener | None = None, spread: tuple[int, int] = (0, 1),
                               watch_s: float = WATCH_S) -> BlobInfo:
        """Ask ``peers`` what they hold of ``digest`` and fetch it from all of them at once.

        Peers without the whole blob (a swarm: see the module docstring) are asked again every
        ``watch_s`` while it runs. ``spread`` = (this node's rank, nodes fetching it together):
        among equally rare chunks this node takes its share first (:meth:`FetchPlan.share
        <omx.storage.fetch_plan.FetchPlan.share>`).
        """
        peers = list(dict.fromkeys(peers))
        index, sources = await probe_sources(self.transport, digest, size, peers)
        if index is None:
            raise NotFound(f"no peer can serve blob {digest} with its chunk index")
        watcher = asyncio.create_task(self._watch(index, peers, watch_s), name=f"swarm-{digest[7:19]}")
        try:
            return await self.fetch_blob(index, sources, on_progress=on_progress, spread=spread)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, index: ChunkIndex, peers: list[NodeId], interval: float) -> None:
        """Tell the transfer of ``index`` what the peers that lack part of it hold now, every ``interval``."""
        try:
            while True:
                await asyncio.sleep(interval)
                running = self._running.get(index.blob)
                if running is None:
                    continue
                plan = running.transfer.plan
                asking = [p for p in peers
                          if not (p in plan.sources and isinstance(plan.sources[p].chunks, AllChunks))]
                if not asking:
                    return
                answers = await asyncio.gather(*(self.transport.blob_state(p, index.blob) for p in asking),
                                               return_exceptions=True)
                for peer, answer in zip(asking, answers, strict=True):
                    if isinstance(answer, PeerBlobState):
                        chunks = availability_for(answer, index)
                        known = plan.sources.get(peer)
                        if chunks and (known is None or known.chunks != chunks):
                            running.transfer.set_source(peer, chunks)
                    elif not isinstance(answer, OmxError):
                        raise answer
        except Exception:  # noqa: BLE001 - the transfer goes on with the sources it has
            log.exception("watching the peers fetching blob %s failed", index.blob)

    async def aclose(self) -> None:
        """Cancel every transfer (partial blobs stay on disk and resume later)."""
        tasks = [r.task for r in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
