"""The node's blob transfers: at most one per digest, listed for status reports.

Two transfers of one blob in one store would share (and clobber) its partial
file, so :meth:`Transfers.fetch_blob` joins a transfer already under way for
the same digest (adding the new caller's sources to it) instead of starting a
second. A transfer runs while anyone waits for it: when every waiter is
cancelled it is cancelled too (its partial blob stays on disk and a later
transfer resumes it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from omx.errors import NotFound
from omx.protocols import PeerTransport
from omx.runtime.peer.bandwidth import Bandwidth
from omx.runtime.peer.fetch import (
    BlobTransfer,
    TransferObserver,
    TransferProgress,
    TransferSettings,
    probe_sources,
)
from omx.storage import BlobInfo, BlobStore, ChunkIndex
from omx.storage.fetch_plan import Availability
from omx.storage.local_chunks import LocalChunks, local_chunk_map
from omx.types import BlobDigest, NodeId

__all__ = ["ProgressListener", "Transfers"]

ProgressListener = Callable[[TransferProgress], None]


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
                         on_progress: ProgressListener | None = None) -> BlobInfo:
        """Fetch the blob ``index`` describes from ``sources`` (peer -> chunks it holds, or ``ALL``)."""
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
                               on_progress: ProgressListener | None = None) -> BlobInfo:
        """Ask ``peers`` what they hold of ``digest`` and fetch it from all of them at once."""
        index, sources = await probe_sources(self.transport, digest, size, peers)
        if index is None:
            raise NotFound(f"no peer can serve blob {digest} with its chunk index")
        return await self.fetch_blob(index, sources, on_progress=on_progress)

    async def aclose(self) -> None:
        """Cancel every transfer (partial blobs stay on disk and resume later)."""
        tasks = [r.task for r in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
