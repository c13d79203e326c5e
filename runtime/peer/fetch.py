"""Fetching one blob from peers (and from chunks already on this node), verified and resumable.

:class:`BlobTransfer` drives a :class:`~omx.storage.fetch_plan.FetchPlan` over
real sources: peers through a :class:`~omx.protocols.PeerTransport`, and the
``local`` source (:class:`~omx.storage.local_chunks.LocalChunks`: chunks with
the same BLAKE3 digest in any blob held here, copied from disk). The blob is
assembled in the store's one partial-blob format (:class:`PartialBlob`: a file
plus a bitmap), so a transfer killed at any point resumes from the chunks on
disk. Each chunk is checked against its BLAKE3 digest before it is written
(``PartialBlob.write_chunk`` does it when the index is known); a bad chunk is
counted, its source penalised, and the chunk fetched elsewhere. The sha256 of
the whole blob is computed in order as chunks arrive (:class:`Sha256Frontier`),
and the blob is published only once it matches its name.

A write that this node's disk refuses stops the transfer with a
:class:`~omx.errors.StoreError` saying why (:func:`omx.storage.space.disk_error`).
When the disk is full, a partial blob this run started is removed again, so
the chunks received do not keep the store full (every other write of the node,
its metadata included, needs that space); one it resumed stays as its bitmap
recorded it.

Usage::

    index, sources = await probe_sources(transport, digest, size, peers)
    info = await BlobTransfer(blobs, index, transport, sources, local=local).run()

:class:`~omx.runtime.peer.transfers.Transfers` runs one transfer per digest per
node and lists them for status reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from omx.errors import IntegrityError, NotFound, OmxError, PeerError, StoreError
from omx.protocols import PeerBlobState, PeerTransport
from omx.runtime.peer.bandwidth import Bandwidth
from omx.runtime.peer.frontier import Sha256Frontier
from omx.storage import BlobInfo, BlobStore, ChunkIndex, PartialBlob
from omx.storage.damaged import clear_damaged
from omx.storage.fetch_plan import ALL, LOCAL, Assignment, Availability, FetchPlan
from omx.storage.local_chunks import LocalChunks
from omx.storage.space import disk_error, is_disk_full
from omx.types import BlobDigest, NodeId

__all__ = ["BlobTransfer", "TransferFailed", "TransferObserver", "TransferProgress", "TransferSettings",
           "availability", "availability_for", "probe_sources"]

log = logging.getLogger("omx.runtime.peer")


class TransferFailed(PeerError):
    """No source could deliver some chunks (the message says which)."""


@dataclass(frozen=True)
class TransferSettings:
    concurrency: int = 3
    """Chunks in flight at once (``models.concurrency``)."""
    stall_timeout: float = 30.0
    """After this long without an answer a chunk may also be asked of another source."""
    max_bad: int = 3
    """Bad chunks after which a source is not used again in this transfer."""
    max_failures: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0
    sync_bytes: int = 64 << 20
    sync_interval: float = 1.0
    """Chunks are written without a per-chunk fsync and recorded in the partial blob's bitmap in
    groups (one fsync + one bitmap write) every ``sync_bytes`` or ``sync_interval`` seconds; a crash
    loses at most that much, which a resumed transfer fetches again."""


@dataclass(frozen=True)
class TransferProgress:
    """Where one blob transfer stands (for progress lines and the replication status)."""

    digest: BlobDigest
    bytes_done: int
    bytes_total: int
    sources: tuple[str, ...]
    """Sources in use: peer node ids, and ``local`` when chunks are copied from this node's blobs."""
    received: Mapping[str, int] = field(default_factory=dict)
    """Bytes received from each source during this run."""
    rejected: int = 0
    """Chunks that failed verification during this run."""
    state: str = "transferring"
    """``transferring``, ``verifying``, ``completed`` or ``failed``."""


class TransferObserver(Protocol):
    """Told about a transfer's traffic (the node's Prometheus metrics implement it)."""

    def bytes_received(self, source: str, n: int) -> None:
        """``source`` is ``peer``, ``local`` or ``registry``."""

    def chunk_rejected(self, source: str) -> None:
        ...

    def transfer_started(self) -> None:
        ...

    def transfer_finished(self) -> None:
        ...


def availability(state: PeerBlobState) -> Availability:
    """The chunks a peer can serve, from its blob state."""
    if state.complete:
        return ALL
    if state.have is None:
        return frozenset()
    count = -(-state.size // state.chunk_size) if state.chunk_size > 0 else 0
    return frozenset(i for i in range(count) if state.has_chunk(i))


async def probe_sources(transport: PeerTransport, digest: BlobDigest, size: int, peers: Iterable[NodeId]
                        ) -> tuple[ChunkIndex | None, dict[NodeId, Availability]]:
    """Ask ``peers`` what they hold of ``digest``; returns the chunk index and each usable peer's chunks.

    The index comes from a complete holder (else from a partial one that knows
    it); only peers whose index has the same root (or that hold nothing yet in a
    compatible layout) count as sources. Unreachable peers are left out.
    """
    peers = list(dict.fromkeys(peers))
    answers = await asyncio.gather(*(transport.blob_state(p, digest) for p in peers), return_exceptions=True)
    states = {p: a for p, a in zip(peers, answers, strict=True) if isinstance(a, PeerBlobState)}
    for a in answers:
        if isinstance(a, BaseException) and not isinstance(a, OmxError):
            raise a
    index: ChunkIndex | None = None
    for state in sorted(states.values(), key=lambda s: not s.complete):
        if state.index_json is None:
            continue
        try:
            candidate = ChunkIndex.from_json(state.index_json)
        except IntegrityError:
            continue
        if candidate.blob == digest and candidate.size == size:
            index = candidate
            break
    if index is None:
        return None, {}
    sources: dict[NodeId, Availability] = {}
    for peer, state in states.items():
        chunks = availability_for(state, index)
        if chunks is not None:
            sources[peer] = chunks
    return index, sources


def availability_for(state: PeerBlobState, index: ChunkIndex) -> Availability | None:
    """The chunks of ``index``'s blob a peer in ``state`` can serve; None when its copy has another
    layout (size, chunk size or chunk-index root)."""
    if state.size != index.size or state.chunk_size != index.chunk_size:
        return None
    if state.index_json is not None:
        try:
            if ChunkIndex.from_json(state.index_json).root != index.root:
                return None
        except IntegrityError:
            return None
    return availability(state)


class BlobTransfer:
    """One blob fetched from many sources (see the module docstring). Call :meth:`run` once."""

    def __init__(
        self,
        blobs: BlobStore,
        index: ChunkIndex,
        transport: PeerTransport,
        sources: Mapping[NodeId, Availability | Iterable[int]] = {},  # noqa: B006 - read only
        *,
        local: LocalChunks | None = None,
        settings: TransferSettings = TransferSettings(),  # noqa: B008 - frozen
        bandwidth: Bandwidth | None = None,
        observer: TransferObserver | None = None,
        on_progress: Callable[[TransferProgress], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        index.validate()
        self.blobs = blobs
        self.index = index
        self.transport = transport
        self.local = local
        self.settings = settings
        self.bandwidth = bandwidth
        self.observer = observer
        self.on_progress = on_progress
        self._clock = clock
        self.plan = FetchPlan(index.chunk_count, concurrency=settings.concurrency,
                              stall_timeout=settings.stall_timeout, max_bad=settings.max_bad,
                              max_failures=settings.max_failures, backoff=settings.backoff,
                              max_backoff=settings.max_backoff)
        for peer, chunks in sources.items():
            self.plan.set_source(peer, chunks)
        self._wake = asyncio.Event()
        self._tasks: dict[Assignment, asyncio.Task[None]] = {}
        self._received: dict[str, int] = {}
        self._rejected = 0
        self._done_bytes = 0
        self._state = "transferring"
        self._fatal: OmxError | None = None
        self._disk_full = False
        self._fresh = False
        """The partial blob was started by this run (it held nothing): removed again after a full disk."""
        self._unsynced = 0
        self._synced_at = clock()
        self._sync: asyncio.Future[int] | None = None
        self._buffers: deque[bytearray] = deque()
        """Chunk buffers to receive into, reused once written and hashed (warm pages, no zeroing)."""

    @property
    def digest(self) -> BlobDigest:
        return self.index.blob

    # ------------------------------------------------------------ sources (may change while running)

    def set_source(self, peer: NodeId, chunks: Availability | Iterable[int]) -> None:
        """Add a peer or replace what it holds (a swarm peer that got more chunks)."""
        self.plan.set_source(peer, chunks)
        self._wake.set()

    def remove_source(self, peer: NodeId) -> None:
        """Stop using ``peer`` (it left or lost the blob); its chunks in flight go elsewhere."""
        self.plan.remove_source(peer)
        self._wake.set()

    @property
    def progress(self) -> TransferProgress:
        in_use = tuple(sorted(n for n, s in self.plan.sources.items() if not s.banned and not s.dropped))
        return TransferProgress(self.digest, self._done_bytes, self.index.size, in_use, dict(self._received),
                                self._rejected, self._state)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)

    # ------------------------------------------------------------ the run

    async def run(self) -> BlobInfo:
        """Fetch every missing chunk, verify the blob, publish it; raises :class:`TransferFailed` when stuck."""
        if await asyncio.to_thread(self.blobs.has, self.digest):
            self._done_bytes, self._state = self.index.size, "completed"
            path = await asyncio.to_thread(self.blobs.path, self.digest)
            return BlobInfo(self.digest, self.index.size, path, created=False, index=self.index)
        try:
            part = await asyncio.to_thread(PartialBlob.open, self.blobs, self.digest, self.index.size,
                                           index=self.index)
        except OSError as exc:
            self._state = "failed"
            raise disk_error(exc, f"blob {self.digest}", self.blobs.root) from exc
        held = part.held()
        self._fresh = not held
        for i in held:
            self.plan.mark_held(i)
        self._done_bytes = sum(self.index.chunk_range(i)[1] for i in held)
        if self.local is not None:
            self.plan.set_source(LOCAL, self.local.holds(self.index) - set(held))
        frontier = Sha256Frontier(part)
        if self.observer is not None:
            self.observer.transfer_started()
        try:
            frontier.offer(-1)
            self._report()
            await self._fetch_all(part, frontier)
            self._state = "verifying"
            self._report()
            info = await frontier.finish(self.index)
            await asyncio.to_thread(clear_damaged, self.blobs, self.digest)
            self._state = "completed"
            self._report()
            return info
        except BaseException as exc:
            self._state = "failed"
            self._report()
            if isinstance(exc, OSError):  # writing the index or publishing the blob
                self._disk_failed(exc)
                assert self._fatal is not None
                raise self._fatal from exc
            raise
        finally:
            frontier.close()
            if self._disk_full and self._fresh:
                await self._discard(part)
            if self.observer is not None:
                self.observer.transfer_finished()

    async def _fetch_all(self, part: PartialBlob, frontier: Sha256Frontier) -> None:
        try:
            while not self.plan.done:
                if self._fatal is not None:
                    raise self._fatal
                now = self._clock()
                for a in self.plan.assign(now):
                    self._tasks[a] = asyncio.create_task(self._fetch(a, part, frontier), name=f"chunk-{a.chunk}")
                if self.plan.done:
                    break
                if self.plan.stuck():
                    missing = sorted(self.plan.unavailable())
                    shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
                    raise TransferFailed(f"no source can deliver {len(missing)} chunk(s) of {self.digest} "
                                         f"(chunks {shown})")
                wake = self.plan.next_wakeup(now)
                self._wake.clear()
                try:
                    async with asyncio.timeout(None if wake is None else max(0.0, wake - now)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.plan.done:  # record what arrived, so a later transfer resumes from it
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(part.sync)

    def _maybe_sync(self, part: PartialBlob, length: int) -> None:
        """Record written chunks in the bitmap in groups (see :class:`TransferSettings`)."""
        self._unsynced += length
        now = self._clock()
        due = self._unsynced >= self.settings.sync_bytes or now - self._synced_at >= self.settings.sync_interval
        if due and (self._sync is None or self._sync.done()):
            self._unsynced, self._synced_at = 0, now
            self._sync = asyncio.ensure_future(asyncio.to_thread(part.sync))
            self._sync.add_done_callback(self._synced)

    def _synced(self, fut: asyncio.Future[int]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if isinstance(exc, OSError):
            self._disk_failed(exc)
            self._wake.set()

    def _disk_failed(self, exc: OSError) -> None:
        """This node's disk refused a write (full, failing): the transfer stops with the reason."""
        self._disk_full = self._disk_full or is_disk_full(exc)
        if self._fatal is None:
            self._fatal = disk_error(exc, f"blob {self.digest}", self.blobs.root)
            if self._disk_full and self._fresh:
                self._fatal = StoreError(f"{self._fatal.message}; the chunks received were removed to give the "
                                         f"space back")
            log.warning("transfer of %s stopped: %s", self.digest, self._fatal.message)

    async def _discard(self, part: PartialBlob) -> None:
        """Remove the partial blob after a full disk: its chunks must not keep the store full."""
        try:
            await asyncio.to_thread(part.abort)
        except OSError as exc:
            log.warning("cannot remove the partial blob %s: %s", self.digest, exc)

    async def _read(self, a: Assignment, buffer: bytearray | None) -> bytes | bytearray | memoryview:
        offset, length = self.index.chunk_range(a.chunk)
        if a.source == LOCAL:
            assert self.local is not None
            return await self.local.read_chunk(self.digest, self.index.chunks[a.chunk], offset, length)
        if self.bandwidth is not None:
            await self.bandwidth.acquire(length)
        into = memoryview(buffer)[:length] if buffer is not None else None
        return await self.transport.read_chunks(NodeId(a.source), self.digest, a.chunk, 1, length, into=into)

    def _release(self, buffer: bytearray | None) -> None:
        """Give a chunk buffer back (any thread); a few are kept warm for the next chunks."""
        if buffer is not None and len(self._buffers) < self.settings.concurrency + 2:
            self._buffers.append(buffer)

    async def _fetch(self, a: Assignment, part: PartialBlob, frontier: Sha256Frontier) -> None:
        kind = "local" if a.source == LOCAL else "peer"
        buffer = None
        if a.source != LOCAL:
            try:
                buffer = self._buffers.pop()
            except IndexError:
                buffer = bytearray(self.index.chunk_size)
        handed_over = writing = False
        try:
            data = await self._read(a, buffer)
            # While the writer thread runs, the buffer is its own: cancelled here, it is never reused.
            writing = True
            await asyncio.to_thread(part.write_chunk, a.chunk, memoryview(data), durable=False)
            writing = False
        except IntegrityError as exc:
            self._rejected += 1
            log.warning("chunk %d of %s from %s rejected: %s", a.chunk, self.digest, a.source, exc)
            self.plan.failed(a, self._clock(), bad=True)
            if self.observer is not None:
                self.observer.chunk_rejected(kind)
        except NotFound as exc:
            log.info("%s no longer serves %s: %s", a.source, self.digest, exc)
            self.plan.failed(a, self._clock(), bad=False)
            self.plan.remove_source(a.source)
        except OmxError as exc:
            # 416 (a swarm peer that does not hold it after all), network errors, 5xx: try elsewhere.
            log.info("chunk %d of %s from %s failed: %s", a.chunk, self.digest, a.source, exc)
            self.plan.failed(a, self._clock(), bad=False)
        except OSError as exc:
            self.plan.cancelled(a)
            self._disk_failed(exc)
        except asyncio.CancelledError:
            self.plan.cancelled(a)
            raise
        else:
            if a.chunk not in self.plan.held:
                self._done_bytes += len(data)
                self._received[a.source] = self._received.get(a.source, 0) + len(data)
                if self.observer is not None:
                    self.observer.bytes_received(kind, len(data))
                frontier.offer(a.chunk, data, lambda: self._release(buffer))
                handed_over = True
                self._maybe_sync(part, len(data))
            for dup in self.plan.completed(a):
                task = self._tasks.get(dup)
                if task is not None:
                    task.cancel()
            self._report()
        finally:
            if not handed_over and not writing:
                self._release(buffer)
            self._tasks.pop(a, None)
            self._wake.set()
