"""What users and peers ask of the replicator: migrate, verify, pull from peers, peer commands.

*Migrate* is coordinated by the node that received the request: the target
fetches the model from every holder (streaming its progress back), and only
once it holds the model complete and verified is the source told to drop its
copy; the source checks the target's fresh inventory itself before it does.
*Verify* re-hashes every chunk of this node's blobs against their BLAKE3 index;
a damaged blob is marked (never served to peers) and, where an alive peer holds
it complete, moved aside into the partial-blob format with its good chunks
marked held, so a normal transfer fetches only the damaged chunks and publishes
the repaired file by rename once its sha256 matches.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from blake3 import blake3

from omx.errors import Conflict, InvalidRequest, ModelNotFound, NotFound, OmxError
from omx.functions.replication_view import (
    MigrationState,
    ModelPlacement,
    RebalanceStarted,
    ReplicationSummary,
    VerifyReport,
)
from omx.runtime.replication.link import DROP_PATH, FETCH_PATH, KICK_PATH
from omx.runtime.replication.replicator import Replicator
from omx.storage import BlobStore, ChunkIndex, ModelName
from omx.storage.damaged import clear_damaged, mark_damaged
from omx.storage.fetch_plan import ALL
from omx.storage.holdings import Origin, model_key
from omx.storage.partial import PartialBlob
from omx.storage.placement import ModelView
from omx.types import BlobDigest, NodeId

__all__ = ["ReplicationService"]

_PROGRESS_S = 0.25


class ReplicationService:
    """The node's :class:`~omx.functions.replication_view.ReplicationView`: the replicator plus operations."""

    def __init__(self, replicator: Replicator) -> None:
        self.r = replicator
        self._migrations: dict[str, MigrationState] = {}

    # ------------------------------------------------------------ placement (the replicator's)

    def placements(self) -> Sequence[ModelPlacement]:
        return self.r.placements()

    def summary(self) -> ReplicationSummary:
        return self.r.summary()

    def forget(self, model: str) -> None:
        self.r.forget(model)

    def kick(self) -> None:
        self.r.kick()

    async def set_factor(self, model: str, factor: int) -> ModelPlacement:
        placed = await self.r.set_factor(model, factor)
        await self.kick_all()
        return placed

    async def rebalance(self) -> RebalanceStarted:
        started = self.r.rebalance_plan()
        await self.kick_all()
        return started

    # ------------------------------------------------------------ helpers

    def _view(self, model: str) -> ModelView:
        key = model_key(model)
        for v in self.r.compute_plan().views:
            if v.key == key:
                return v
        raise ModelNotFound(model)

    def resolve_node(self, text: str) -> NodeId:
        """An alive member by id, name or unique id prefix."""
        alive = [m for m in self.r.link.members() if m.status == "alive"]
        for m in alive:
            if text in (m.id, m.name):
                return NodeId(m.id)
        matches = [m for m in alive if m.id.startswith(text)]
        if len(matches) == 1:
            return NodeId(matches[0].id)
        if matches:
            raise InvalidRequest(f"node {text!r} is ambiguous: " + ", ".join(m.id for m in matches))
        raise NotFound(f"node {text!r} is not an alive member of the cluster")

    async def kick_all(self) -> None:
        """Reconcile here now and ask every alive peer to do the same."""
        self.r.kick()
        peers = [m.id for m in self.r.link.members() if m.status == "alive" and m.id != self.r.node_id]
        await asyncio.gather(*(self.r.commands.post(NodeId(p), KICK_PATH, {}) for p in peers),
                             return_exceptions=True)

    # ------------------------------------------------------------ migrate

    async def migrate(self, model: str, from_text: str, to_text: str) -> MigrationState:
        source, target = self.resolve_node(from_text), self.resolve_node(to_text)
        if source == target:
            raise InvalidRequest("from_node and to_node are the same node")
        view = self._view(model)
        if source not in view.holders:
            raise InvalidRequest(f"node {source} does not hold '{view.name}' complete")
        if target in view.holders:
            raise Conflict(f"node {target} already holds '{view.name}'")
        state = MigrationState(migration_id=f"mig-{secrets.token_hex(6)}", model=view.name, from_node=source,
                               to_node=target, status="started", progress=0.0, started_at=self.r.clock())
        self._migrations[state.migration_id] = state
        self.r.keep.add((view.key, target))
        self.r.leaving.add((view.key, source))
        self.r.spawn(self._run_migration(state, view), f"migrate-{state.migration_id}")
        return state

    def migration(self, migration_id: str) -> MigrationState | None:
        return self._migrations.get(migration_id)

    def _update(self, state: MigrationState, **changes: Any) -> MigrationState:
        state = replace(self._migrations[state.migration_id], **changes)
        self._migrations[state.migration_id] = state
        return state

    async def _run_migration(self, state: MigrationState, view: ModelView) -> None:
        source, target = NodeId(state.from_node), NodeId(state.to_node)
        try:
            state = self._update(state, status="transferring")
            if target == self.r.node_id:
                fetch = self.r.start_fetch(view.name, view.digest, "user", view.holders)
                while fetch.task is not None and not fetch.task.done():
                    done, total = fetch.done_total
                    state = self._update(state, progress=0.99 * done / total if total else 0.0)
                    await asyncio.sleep(_PROGRESS_S)
                await self.r.wait_fetch(fetch)
            else:
                doc = {"model": view.name, "digest": view.digest, "origin": "user"}
                async for item in self.r.commands.stream(target, FETCH_PATH, doc):
                    total = int(item.get("bytes_total") or 0)
                    if total:
                        state = self._update(state, progress=0.99 * int(item.get("bytes_done") or 0) / total)
                await self.r.link.refresh_peer(target)
            if source == self.r.node_id:
                await self._drop_own(view.name, view.digest, target)
            else:
                await self.r.commands.post(source, DROP_PATH,
                                           {"model": view.name, "digest": view.digest, "keeper": target})
            self._update(state, status="completed", progress=1.0, finished_at=self.r.clock())
        except asyncio.CancelledError:
            self._update(state, status="failed", error="the node stopped", finished_at=self.r.clock())
            raise
        except OmxError as exc:
            self._update(state, status="failed", error=exc.message, finished_at=self.r.clock())
        except Exception as exc:  # noqa: BLE001 - reported in the migration's state
            self._update(state, status="failed", error=f"internal error: {type(exc).__name__}",
                         finished_at=self.r.clock())
        finally:
            self.r.keep.discard((view.key, target))
            self.r.leaving.discard((view.key, source))
            self.r.kick()

    async def _drop_own(self, model: str, digest: str, keeper: str) -> bool:
        """Drop this node's copy once ``keeper`` (freshly asked) holds ``model`` at ``digest`` complete."""
        await self.r.link.refresh_peer(keeper)
        node = self.r.link.cluster_snapshot().get(NodeId(keeper))
        held = node.holdings.model(model) if node is not None and node.holdings is not None and node.alive else None
        if held is None or held.digest != digest:
            raise Conflict(f"node {keeper} does not hold '{model}' complete yet; the copy here stays")
        # No local rule keeps the model off this node afterwards: peers would not know it, and when a holder
        # dies later and rendezvous picks this node, each would wait for the other to add the copy.
        return await self.r.remove_local(model, BlobDigest(digest), reason=f"migrated to {keeper}")

    async def drop_command(self, model: str, digest: str, keeper: str) -> dict[str, object]:
        """A peer's migration asks this node to drop its copy (checked against ``keeper``'s inventory)."""
        dropped = await self._drop_own(model, digest, keeper)
        return {"dropped": dropped, "model": model, "node": self.r.node_id}

    # ------------------------------------------------------------ fetch for a peer or a pull

    def _holders(self, model: str) -> tuple[ModelView, tuple[NodeId, ...]]:
        view = self._view(model)
        holders = tuple(n for n in view.holders if n != self.r.node_id)
        if not holders:
            raise NotFound(f"no alive peer holds '{view.name}'")
        return view, holders

    async def fetch_command(self, model: str, digest: str | None, origin: Origin
                            ) -> AsyncIterator[dict[str, object]]:
        """Fetch ``model`` from its holders; yields progress objects, then ``{"status": "success"}``."""
        view = self._view(model)
        if origin == "demand" and self.r.node_id in view.holders and digest in (None, view.digest):
            return _held(view)  # asked twice (two entry nodes): the copy is here already, whatever its origin
        view, holders = self._holders(model)
        if digest is not None and digest != view.digest:
            raise Conflict(f"the cluster's '{view.name}' is at {view.digest}, not {digest}")
        fetch = self.r.start_fetch(view.name, view.digest, origin, holders)

        async def lines() -> AsyncIterator[dict[str, object]]:
            while fetch.task is not None and not fetch.task.done():
                done, total = fetch.done_total
                yield {"status": "fetching", "bytes_done": done, "bytes_total": total,
                       "sources": list(fetch.sources)}
                await asyncio.wait({fetch.task}, timeout=_PROGRESS_S)
            await self.r.wait_fetch(fetch)
            done, total = fetch.done_total
            yield {"status": "success", "digest": view.digest, "bytes_done": done, "bytes_total": total}

        return lines()

    def peer_pull(self, model: str) -> AsyncIterator[dict[str, object]] | None:
        """Ollama's pull progress for ``model`` fetched from peers; None when no alive peer holds it."""
        try:
            view, holders = self._holders(model)
        except NotFound:
            return None
        requested = ModelName.parse(model)
        if model_key(requested.display) != view.key:
            return None
        fetch = self.r.start_fetch(view.name, view.digest, "user", holders)
        return self._pull_lines(fetch, view, holders)

    async def _pull_lines(self, fetch: Any, view: ModelView, holders: tuple[NodeId, ...]
                          ) -> AsyncIterator[dict[str, object]]:
        yield {"status": "pulling manifest"}
        yield {"status": f"pulling from cluster peers: {', '.join(holders)}"}
        sent: dict[str, tuple[int, int]] = {}

        def changed() -> list[dict[str, object]]:
            out: list[dict[str, object]] = []
            for digest, (done, total) in list(fetch.layers.items()):
                if sent.get(digest) != (done, total):
                    sent[digest] = (done, total)
                    out.append({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total,
                                "completed": done})
            return out

        while fetch.task is not None and not fetch.task.done():
            for line in changed():
                yield line
            await asyncio.wait({fetch.task}, timeout=_PROGRESS_S)
        await self.r.wait_fetch(fetch)
        for line in changed():
            yield line
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    # ------------------------------------------------------------ verify

    async def verify(self, model: str | None) -> VerifyReport:
        blobs = self.r.store.blobs
        if model is not None:
            resolved = await self.r.store.resolve(model)
            digests = [d for d in resolved.manifest.blobs if blobs.is_own(d)]
        else:
            digests = await asyncio.to_thread(blobs.digests)
        checked_chunks = damaged = repaired = 0
        details: list[dict[str, Any]] = []
        for digest in digests:
            index = await asyncio.to_thread(blobs.index, digest)
            bad = await asyncio.to_thread(_damaged_chunks, blobs, index)
            checked_chunks += index.chunk_count
            if not bad:
                continue
            damaged += 1
            await asyncio.to_thread(mark_damaged, blobs, digest, "verify: chunk hash mismatch", bad)
            error = await self._repair(digest, index, bad)
            repaired += error is None
            details.append({"digest": digest, "damaged": True, "damaged_chunks": bad, "repaired": error is None,
                            "error": error})
        return VerifyReport(checked_blobs=len(digests), checked_chunks=checked_chunks, damaged=damaged,
                            repaired=repaired, unrepaired=damaged - repaired, details=tuple(details))

    async def _repair(self, digest: BlobDigest, index: ChunkIndex, bad: list[int]) -> str | None:
        """Refetch ``bad`` chunks of ``digest`` from peers holding it complete; None on success, else why not."""
        snapshot = self.r.link.cluster_snapshot()
        sources = {n.node: ALL for n in snapshot.alive
                   if n.node != self.r.node_id and n.holdings is not None and n.holdings.blob(digest) is not None}
        if not sources:
            return "no alive peer holds this blob complete; the damaged copy is kept and not served"
        blobs = self.r.store.blobs
        await asyncio.to_thread(_move_aside, blobs, digest, index, bad)
        try:
            await self.r.transfers.fetch_blob(index, sources)
        except OmxError as exc:
            return f"repair failed: {exc.message} (the good chunks are kept; a later transfer resumes)"
        await asyncio.to_thread(clear_damaged, blobs, digest)
        await self.r.link.publish_inventory()
        return None


async def _held(view: ModelView) -> AsyncIterator[dict[str, object]]:
    yield {"status": "success", "digest": view.digest, "bytes_done": view.size, "bytes_total": view.size}


def _damaged_chunks(blobs: BlobStore, index: ChunkIndex) -> list[int]:
    """Chunk numbers whose bytes no longer hash to the index (blocking; reads the whole blob once)."""
    bad = []
    with open(blobs.path(index.blob), "rb", buffering=0) as f:
        for i, expected in zip(itertools.count(), index.chunks, strict=False):
            offset, length = index.chunk_range(i)
            data = os.pread(f.fileno(), length, offset)
            if len(data) != length or blake3(data).hexdigest() != expected:
                bad.append(i)
    return bad


def _move_aside(blobs: BlobStore, digest: BlobDigest, index: ChunkIndex, bad: list[int]) -> None:
    """Turn a damaged blob into a partial blob holding its good chunks (by rename, nothing copied)."""
    PartialBlob.adopt(blobs, blobs.own_path(digest), index, held=set(range(index.chunk_count)) - set(bad))
