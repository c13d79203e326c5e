"""The replicator: the async shell that carries out placement on this node.

Every node runs the same pure :func:`omx.storage.placement.plan` over its
:class:`~omx.storage.placement.ClusterSnapshot` and acts only on the actions
that name itself: it *fetches* the models it should add (from every peer that
holds them, chunk by chunk, through :mod:`omx.runtime.peer`, and from the peers
fetching the same model at the same time, which trade the chunks they got) and *drops* the
replicas it should drop, after re-checking against fresh inventories of the
holders that keep the model. Reconcile runs after membership or inventory
changes (:meth:`Replicator.kick`), periodically, and on rebalance.

A failed fetch is not a loop: placement only picks a node whose free space (and
cache limit) covers what it lacks, and a fetch runs only when the store's disk
has that room (a full disk fails it with a clear error and gives the space
back), so a node whose disk filled is passed over for another; should placement
still pick it, reconcile starts the fetch again only after
:attr:`ReplicationSettings.retry_s`, doubled for each failure in a row. A
user's pull or migration is tried at once.

Migrations, verification and the pull-from-peers path live in
:mod:`omx.runtime.replication.operations`, whose :class:`ReplicationService` is
what handlers see; this module owns the loop, the transfers it started and the
placement reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from omx.errors import ModelNotFound, OmxError
from omx.functions.replication_view import (
    ModelPlacement,
    PlanStep,
    RebalanceStarted,
    ReplicationSummary,
    TransferFacts,
    TransferState,
)
from omx.runtime.peer.fetch import TransferProgress
from omx.runtime.peer.model import fetch_model
from omx.runtime.peer.transfers import Transfers
from omx.runtime.replication.link import ClusterLink, PeerCommands
from omx.storage import Layer, ModelStore
from omx.storage.eviction import evictions
from omx.storage.holdings import Origin, model_key
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.placement import DEFAULT_IDLE_AFTER_S, Action, ClusterSnapshot, Constraints, ModelView, Plan, plan
from omx.storage.replication_status import replication_health, status_of
from omx.storage.space import disk_error
from omx.types import BlobDigest, NodeId

__all__ = ["ReplicationSettings", "Replicator"]

log = logging.getLogger("omx.replication")

NOMINAL_RATE = 100e6
"""Bytes/s assumed for a rebalance estimate when no bandwidth limit is configured."""
FORGET_S = 120.0
"""How long no node places a copy of a model a user deleted (the delete reaches every holder well within it)."""


@dataclass(frozen=True)
class ReplicationSettings:
    default_factor: int = 2
    auto_cleanup: bool = True
    max_cache_size: int = 0
    """Bytes; 0: no limit."""
    max_bandwidth: float = 0.0
    """Bytes/s; 0: unlimited."""
    interval_s: float = 10.0
    """Reconcile at least this often."""
    settle_s: float = 0.2
    """Coalesce kicks arriving within this long into one reconcile."""
    retry_s: float = 10.0
    """After a failed fetch, reconcile adds the model here again only after this long, doubled for every
    further failure in a row up to ``max_retry_s`` (a user's pull or migration is not held back)."""
    max_retry_s: float = 600.0
    idle_after: float = DEFAULT_IDLE_AFTER_S
    """A copy added for demand is dropped after this long without a request (``replication.idle_after``)."""

    def retry_delay(self, failures: int) -> float:
        """Seconds before reconcile retries a fetch that failed ``failures`` times in a row."""
        return float(min(self.max_retry_s, self.retry_s * 2 ** min(max(failures, 1) - 1, 30)))


@dataclass
class _Fetch:
    """One model this node is fetching (for a plan, a migration or a pull)."""

    model: str
    digest: BlobDigest | None
    origin: Origin
    sources: tuple[str, ...] = ()
    swarm: tuple[str, ...] = ()
    """Peers fetching the same model (or about to): sources of the chunks they got."""
    spread: tuple[int, int] = (0, 1)
    """This node's rank among the nodes fetching the model together, and their number."""
    layers: dict[BlobDigest, tuple[int, int]] = field(default_factory=dict)
    """Per blob: (bytes done, bytes total)."""
    state: str = "running"
    error: str | None = None
    task: asyncio.Task[None] | None = None
    finished_at: float | None = None
    failures: int = 0
    """Failed fetches of this model in a row before this one."""
    exc: OmxError | None = None

    @property
    def done_total(self) -> tuple[int, int]:
        return sum(d for d, _ in self.layers.values()), sum(t for _, t in self.layers.values())


class Replicator:
    """Reconciles this node toward the cluster's placement (see the module docstring)."""

    def __init__(self, *, node_id: str, store: ModelStore, meta: HoldingsMeta, link: ClusterLink,
                 transfers: Transfers, commands: PeerCommands, settings: ReplicationSettings,
                 clock: Callable[[], float] = time.time, in_use: Callable[[], Iterable[str]] = tuple) -> None:
        self.node_id = NodeId(node_id)
        self.store = store
        self.meta = meta
        self.link = link
        self.transfers = transfers
        self.commands = commands
        self.settings = settings
        self.clock = clock
        self.in_use = in_use
        """Keys of the models serving requests here now: never dropped nor evicted meanwhile."""
        self._fetches: dict[str, _Fetch] = {}
        self._failed: dict[str, _Fetch] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.keep: set[tuple[str, NodeId]] = set()
        self.leaving: set[tuple[str, NodeId]] = set()
        self.avoid: dict[tuple[str, NodeId], float] = {}
        """Copies placement must not add here, until the given time."""
        self.last_plan: Plan = Plan()
        self.reconciles = 0
        """Rounds of the reconcile loop finished (drops and evictions included), for status reports."""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="replicator")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks, *(f.task for f in self._fetches.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        await self.commands.aclose()

    def kick(self) -> None:
        """Reconcile soon (membership or inventories changed, or a user asked)."""
        self._wake.set()

    def forget(self, model: str, for_s: float = FORGET_S) -> None:
        """A user deletes ``model`` from the cluster: add it on no node for ``for_s``, stop fetching it here.

        Every node the delete reaches does the same, so their plans agree (see :class:`Constraints`).
        """
        key = model_key(model)
        until = self.clock() + for_s
        for view in self.link.cluster_snapshot().nodes:
            self.avoid[(key, view.node)] = max(until, self.avoid.get((key, view.node), until))
        self.avoid[(key, self.node_id)] = max(until, self.avoid.get((key, self.node_id), until))
        fetch = self._fetches.get(key)
        if fetch is not None and fetch.task is not None:
            fetch.task.cancel()
        self._failed.pop(key, None)

    def spawn(self, coro: object, name: str) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one failed round is retried on the next
                log.exception("reconcile failed")
            self.reconciles += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.interval_s)
            await asyncio.sleep(self.settings.settle_s)
            self._wake.clear()

    # ------------------------------------------------------------ planning

    def constraints(self) -> Constraints:
        now = self.clock()
        for pair, until in list(self.avoid.items()):
            if until <= now:
                del self.avoid[pair]
        busy = {(k, self.node_id) for k in self.in_use()}
        return Constraints(keep=frozenset(self.keep | busy), avoid=frozenset(self.avoid),
                           leaving=frozenset(self.leaving))

    def compute_plan(self, snapshot: ClusterSnapshot | None = None) -> Plan:
        snapshot = snapshot or self.link.cluster_snapshot()
        return plan(snapshot, self.settings.default_factor, self.clock(), constraints=self.constraints(),
                    idle_after=self.settings.idle_after)

    async def reconcile(self) -> Plan:
        """One round: compute the plan, start this node's adds, carry out its drops and evictions."""
        snapshot = self.link.cluster_snapshot()
        self._adopt_factors(snapshot)
        full = self.compute_plan(snapshot)
        self.last_plan = full
        mine = full.for_node(self.node_id)
        views = {v.key: v for v in full.views}
        for action in mine.adds:
            if action.key not in self._fetches and not self._backing_off(action.key):
                view = views[action.key]
                fellows = sorted({a.node for a in full.adds if a.key == action.key} | {self.node_id})
                swarm = sorted((set(fellows) | set(view.in_progress)) - {self.node_id} - set(view.holders))
                self.start_fetch(action.model, view.digest, "replica", view.holders, swarm=swarm,
                                 spread=(fellows.index(self.node_id), len(fellows)))
        for action in mine.drops:
            await self._drop(action)
        if self.settings.auto_cleanup and self.settings.max_cache_size > 0:
            for model in evictions(snapshot, self.node_id, self.settings.max_cache_size, keep=self.in_use()):
                await self._evict(model.name, model.digest)
        return full

    def _backing_off(self, key: str) -> bool:
        """Whether a failed fetch of ``key`` is too recent for reconcile to retry it (see ``retry_s``)."""
        failed = self._failed.get(key)
        if failed is None or failed.finished_at is None:
            return False
        return self.clock() < failed.finished_at + self.settings.retry_delay(failed.failures + 1)

    def _adopt_factors(self, snapshot: ClusterSnapshot) -> None:
        overrides = snapshot.factors()
        if overrides and self.meta.adopt_factors(overrides.values()):
            self.spawn(self.link.publish_inventory(), "publish-factors")

    # ------------------------------------------------------------ fetching

    def start_fetch(self, model: str, digest: BlobDigest | None, origin: Origin, holders: Sequence[str], *,
                    swarm: Sequence[str] = (), spread: tuple[int, int] = (0, 1)) -> _Fetch:
        """Fetch ``model`` from ``holders`` in the background (joined if already running).

        ``swarm`` and ``spread``: see :func:`~omx.runtime.peer.model.fetch_model`.
        """
        key = model_key(model)
        running = self._fetches.get(key)
        if running is not None and running.task is not None and not running.task.done():
            if origin == "user" and running.origin != "user":
                running.origin = "user"
            return running
        failed = self._failed.pop(key, None)
        fetch = _Fetch(model, digest, origin, tuple(holders), tuple(swarm), spread,
                       failures=failed.failures + 1 if failed is not None else 0)
        self._fetches[key] = fetch
        fetch.task = asyncio.create_task(self._fetch(fetch), name=f"fetch-{model}")
        return fetch

    async def _fetch(self, fetch: _Fetch) -> None:
        key = model_key(fetch.model)
        now = self.clock()
        digest = fetch.digest
        try:
            created_at = self._created_at(fetch.model, digest) or now
            if digest is not None:
                self.meta.begin(fetch.model, digest, origin=fetch.origin, now=now)
                await self.link.publish_inventory()

            def progress(layer: Layer, p: TransferProgress) -> None:
                fetch.layers[layer.digest] = (p.bytes_done, p.bytes_total)
                fetch.sources = tuple(sorted(set(fetch.sources) | set(p.sources)))
                self.meta.progress(fetch.model, self.clock())

            result = await fetch_model(self.store, self.transfers, fetch.model, [NodeId(n) for n in fetch.sources],
                                       expected_digest=digest, on_progress=progress,
                                       swarm=[NodeId(n) for n in fetch.swarm], spread=fetch.spread)
            for blob in result.manifest.blobs:
                size = next((layer.size for layer in (*result.manifest.layers, result.manifest.config)
                             if layer.digest == blob), 0)
                done, total = fetch.layers.get(blob, (size, size))
                fetch.layers[blob] = (max(done, total), total)
            self.meta.record(fetch.model, result.digest, origin=fetch.origin, created_at=created_at,
                             now=self.clock())
            fetch.state = "completed"
            log.info("fetched %s from %s", fetch.model, ", ".join(fetch.sources))
        except asyncio.CancelledError:
            fetch.state = "failed"
            fetch.error = "cancelled"
            raise
        except OmxError as exc:
            fetch.state, fetch.error, fetch.exc = "failed", exc.message, exc
            log.warning("fetching %s failed: %s", fetch.model, exc.message)
        except OSError as exc:  # this node's records (holdings.json) could not be written
            error = disk_error(exc, f"the records of '{fetch.model}'", self.store.root)
            fetch.state, fetch.error, fetch.exc = "failed", error.message, error
            log.warning("fetching %s failed: %s", fetch.model, error.message)
        except Exception as exc:  # noqa: BLE001 - a transfer never takes the node down
            fetch.state, fetch.error = "failed", f"internal error: {type(exc).__name__}"
            log.exception("fetching %s failed", fetch.model)
        finally:
            fetch.finished_at = self.clock()
            try:
                self.meta.end(fetch.model)
            except OSError as exc:  # gone from the records in memory; the file catches up on its next write
                log.warning("cannot record the end of fetching %s: %s", fetch.model, exc)
            if self._fetches.get(key) is fetch:
                del self._fetches[key]
            if fetch.state == "failed":
                self._failed[key] = fetch
            with contextlib.suppress(Exception):
                await self.link.publish_inventory()
            self.kick()

    def _created_at(self, model: str, digest: BlobDigest | None) -> float | None:
        key = model_key(model)
        for n in self.link.cluster_snapshot().nodes:
            held = n.holdings.model(key) if n.holdings is not None else None
            if held is not None and (digest is None or held.digest == digest):
                return held.created_at
        return None

    async def wait_fetch(self, fetch: _Fetch) -> None:
        if fetch.task is not None:
            await asyncio.shield(fetch.task)
        if fetch.state != "completed":
            raise OmxError(f"fetching '{fetch.model}' failed: {fetch.error}",
                           status=fetch.exc.status if fetch.exc is not None else None)

    # ------------------------------------------------------------ dropping

    async def _drop(self, action: Action) -> None:
        """Drop this node's surplus copy after re-checking the holders that keep it, freshly."""
        view = next((v for v in self.last_plan.views if v.key == action.key), None)
        if view is None:
            return
        keepers = [n for n in view.holders if n != self.node_id]
        for node in keepers:
            with contextlib.suppress(OmxError):
                await self.link.refresh_peer(node)
        fresh = self.compute_plan()
        if not any(a.key == action.key and a.node == self.node_id for a in fresh.for_node(self.node_id).drops):
            return
        await self.remove_local(action.model, action.digest, reason=action.reason)

    async def _evict(self, name: str, digest: BlobDigest) -> None:
        await self.remove_local(name, digest, reason="evicted (models.max_cache_size)")

    async def remove_local(self, name: str, digest: BlobDigest, *, reason: str) -> bool:
        """Delete this node's copy of ``name`` if it is still at ``digest``."""
        try:
            resolved = await self.store.resolve(name)
        except ModelNotFound:
            return False
        if resolved.manifest_digest != digest:
            return False
        await self.store.delete(name)
        self.meta.forget(name)
        log.info("dropped %s (%s)", name, reason)
        await self.link.publish_inventory()
        return True

    # ------------------------------------------------------------ ReplicationView reads

    def _views(self) -> tuple[ModelView, ...]:
        full = self.compute_plan()
        self.last_plan = full
        return full.views

    def placements(self) -> Sequence[ModelPlacement]:
        return [ModelPlacement(name=s.name, factor=s.factor, nodes=tuple(s.nodes), total_size=s.total_size,
                               status=s.status) for s in map(status_of, self._views())]

    def transfers_facts(self) -> tuple[TransferFacts, ...]:
        facts = []
        for fetch in (*self._fetches.values(), *self._failed.values()):
            done, total = fetch.done_total
            for digest, (d, t) in fetch.layers.items() or {BlobDigest(fetch.digest or ""): (done, total)}.items():
                facts.append(TransferFacts(model=fetch.model, digest=str(digest), to=self.node_id,
                                           sources=fetch.sources, bytes_done=d, bytes_total=t,
                                           state=_transfer_state(fetch), error=fetch.error))
        return tuple(facts)

    def summary(self) -> ReplicationSummary:
        views = self._views()
        statuses = [status_of(v) for v in views]
        ready = sum(1 for s in statuses if s.status == "ready")
        pending = len(self.last_plan.adds)
        return ReplicationSummary(
            total_models=len(views), replicated_models=ready, pending_replications=pending,
            failed_replications=len(self._failed), replication_health=replication_health(statuses),
            transfers=self.transfers_facts(), reconciles=self.reconciles)

    async def set_factor(self, model: str, factor: int) -> ModelPlacement:
        """Record ``model``'s factor (gossiped in this node's inventory; the newest setting wins)."""
        key = model_key(model)
        views = {v.key: v for v in self._views()}
        if key not in views:
            raise ModelNotFound(model)
        self.meta.set_factor(views[key].name, factor, self.clock())
        await self.link.publish_inventory()
        placed = next(p for p in self.placements() if model_key(p.name) == key)
        return replace(placed, factor=factor)

    def rebalance_plan(self) -> RebalanceStarted:
        full = self.compute_plan()
        steps = tuple(PlanStep(a.kind, a.model, a.node, a.bytes) for a in (*full.adds, *full.drops))
        rate = self.settings.max_bandwidth or NOMINAL_RATE
        estimate = sum(a.bytes for a in full.adds) / rate
        return RebalanceStarted(rebalance_id=f"rebalance-{int(self.clock() * 1000):x}", plan=steps,
                                estimated_time=estimate)


def _transfer_state(fetch: _Fetch) -> TransferState:
    if fetch.state == "completed":
        return "completed"
    if fetch.state == "failed":
        return "failed"
    return "running" if fetch.done_total[1] else "queued"
