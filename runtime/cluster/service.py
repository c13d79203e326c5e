"""The node's cluster service: Serf membership, inventories, events, metrics.

:class:`ClusterService` implements :class:`omx.functions.cluster_view.ClusterView`
(what the cluster handlers see) and :class:`~omx.functions.cluster_view.UsageSink`.
It owns the supervised Serf agent and its :class:`~omx.mesh.Membership`, the
local and peer inventories, the resource sampler, the Prometheus metrics and
the event bus. Without a ``serf`` binary the node runs standalone and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from omx.errors import OmxError, PeerError
from omx.functions.builtin.cluster import health_services
from omx.functions.cluster_view import AgentFacts, Counters, NodeRecord, Resources
from omx.functions.dispatch import Dispatcher, RequestDone, peer_verifier
from omx.mesh import (
    AgentConfig,
    ClusterSecret,
    JoinToken,
    MemberChanged,
    MeshError,
    SerfAgent,
    Verifier,
    serf_available,
)
from omx.mesh.membership import Membership
from omx.protocols import Scheduler
from omx.runtime.cluster.inventory import PEER_REFRESH_S, LocalInventory, PeerInventories, snapshot_of
from omx.runtime.cluster.keys import persist_secret, resolve_secret
from omx.runtime.cluster.member_addresses import MemberAddresses
from omx.runtime.cluster.metrics import LiveFacts, NodeMetrics
from omx.runtime.cluster.records import member_record
from omx.runtime.cluster.resources import ResourceSampler
from omx.runtime.cluster.stream import EventMessages
from omx.runtime.cluster.topology import Topology, topology
from omx.runtime.config import Settings
from omx.runtime.events import EventBus, MemberUpdate, NodeStateChanged
from omx.runtime.tls import cluster_ca
from omx.storage import ModelStore
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.placement import ClusterSnapshot

__all__ = ["ClusterService"]

log = logging.getLogger("omx.cluster")

REPLAY_WINDOW_S = 30.0
STORE_CHANGING_HANDLERS = frozenset({"create", "copy", "delete", "pull", "blob_upload"})


class ClusterService:
    """Membership and observability of one node (see the module docstring)."""

    def __init__(self, settings: Settings, node_id: str, store: ModelStore, scheduler: Scheduler,
                 dispatcher: Dispatcher, *, serf_binary: str = "serf",
                 env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.node_id = node_id
        self.store = store
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.serf_binary = serf_binary
        joining = bool(settings.p2p.join)
        resolution = resolve_secret(settings.cluster.token, settings.secret_path, joining,
                                    os.environ if env is None else env)
        self.secret_source = resolution.source
        self.seeds = tuple(dict.fromkeys((*settings.p2p.join, *resolution.seeds)))
        self.bus = EventBus()
        self.metrics = NodeMetrics(store.root)
        self.meta = HoldingsMeta(store.root)
        # models.max_cache_size 0 means no limit, for placement as for eviction.
        self.local = LocalInventory(store, self.meta, cache_limit=settings.models.max_cache_size or None)
        self.sampler = ResourceSampler(settings.store_path)
        self.secret = resolution.secret
        self.peers = PeerInventories(node_id, key=lambda: self.secret.peer_auth_key(), on_fetch=self.metrics.peer_sync)
        self._set_secret(resolution.secret)
        dispatcher.add_request_observer(self._request_done)
        self.topology: Topology | None = None
        self.serf_version: str | None = None
        self.serf_installed = False
        self.membership: Membership | None = None
        self._should_run = False
        self._reason: str | None = None
        self._restarts_before = 0
        self._requests = 0
        self._model_requests: dict[str, int] = {}
        self._model_tokens: dict[str, int] = {}
        self._ws = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.addresses = MemberAddresses(node_id, lambda: self.membership)
        self._follower: asyncio.Task[None] | None = None
        self._switch = asyncio.Lock()
        self._last_state: tuple[Any, dict[str, Any]] | None = None  # (cheap key, health services) last published
        self.on_agent_change: Callable[[], object] | None = None
        self.change_listeners: list[Callable[[], None]] = []
        """Called when membership, a peer's inventory or this node's inventory changed (the replicator)."""
        self._agent_pid: int | None = None
        self.functions_version = ""  # the function table's digest this node gossips (the ``fn`` tag)
        self.on_secret_change: Callable[[], object] | None = None
        """Called (in a thread) after a join adopted another cluster's secret: the node rewrites its TLS files."""

    # ------------------------------------------------------------ lifecycle

    async def start(self, api_host: str, api_port: int, transfer_port: int | None = None,
                    *, h3_port: int | None = None) -> None:
        """Start sampling, the inventory and (when serf is installed) the agent; never fails on serf."""
        self.topology = await asyncio.to_thread(topology, self.settings, api_host, api_port, transfer_port,
                                                h3_port)
        self.sampler.api_port = api_port
        await self.local.refresh()
        available, self.serf_version = await asyncio.to_thread(serf_available, self.serf_binary)
        self.serf_installed = available
        if not available:
            self._reason = f"no '{self.serf_binary}' binary found: this node runs alone (install the serf package)"
            log.warning("%s", self._reason)
        else:
            self._should_run = True
            await self._start_agent(self.seeds)
        self._spawn(self.local.watch(self._inventory_changed), "inventory-watch")
        self._spawn(self._monitor(), "cluster-monitor")
        self._spawn(self._refresh_peers(), "peer-refresh")

    async def stop(self, leave: bool = True) -> None:
        """Stop everything; leave the cluster gracefully when ``leave``."""
        self.bus.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._stop_agent(leave=leave)
        await self.peers.aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _set_secret(self, secret: ClusterSecret) -> None:
        self.secret = secret
        self.dispatcher.peer_verifier = peer_verifier(Verifier(secret.peer_auth_key(), window_s=REPLAY_WINDOW_S))

    # ------------------------------------------------------------ agent

    def _agent_config(self, seeds: tuple[str, ...]) -> AgentConfig:
        topo = self.topology
        assert topo is not None
        tags = topo.tags(self.local.version, self.functions_version)
        return AgentConfig(
            node_name=self.node_id, bind=topo.p2p_bind, port=topo.p2p_port,
            advertise=topo.p2p_advertise if topo.p2p_advertise != topo.p2p_bind else None,
            profile=self.settings.p2p.profile, tags=tags, encrypt_key=self.secret.gossip_key(),
            rpc_auth=self.secret.rpc_auth_token(), join=seeds)

    async def _start_agent(self, seeds: tuple[str, ...]) -> None:
        """Start a fresh agent + membership; on failure keep retrying in the background."""
        agent = SerfAgent(self._agent_config(seeds), self.settings.home / "cluster" / "serf",
                          binary=self.serf_binary)
        membership = Membership(agent)
        self.membership = membership
        try:
            await membership.start(timeout_s=30.0)
        except MeshError as exc:
            log.error("serf agent did not start: %s", exc)
            self._spawn(self._retry_start(membership), "serf-start-retry")
            return
        self._follow(membership)

    async def _retry_start(self, membership: Membership) -> None:
        delay = 1.0
        while self.membership is membership and self._should_run:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                await membership.agent.stop(graceful=False)
                await membership.start(timeout_s=30.0)
            except MeshError as exc:
                log.warning("serf agent start failed again: %s", exc)
                continue
            self._follow(membership)
            return

    def _follow(self, membership: Membership) -> None:
        if self._follower is not None:
            self._follower.cancel()
        self._follower = self._spawn(self._follow_members(membership), "membership-follower")

    async def _stop_agent(self, leave: bool) -> None:
        membership, self.membership = self.membership, None
        if self._follower is not None:
            self._follower.cancel()
            self._follower = None
        if membership is not None:
            self._restarts_before += membership.agent.restarts
            with contextlib.suppress(MeshError):
                await membership.stop(leave=leave)

    async def join(self, token: str) -> dict[str, Any]:
        """Adopt a join token: persist its secret, restart the agent with the new key, join its seeds."""
        parsed = JoinToken.parse(token)
        if not self.serf_installed:
            raise OmxError(self._reason or "serf is not installed on this node", status=503)
        async with self._switch:
            await asyncio.to_thread(persist_secret, self.settings.secret_path, parsed.secret)
            self._set_secret(parsed.secret)
            if self.on_secret_change is not None:
                await asyncio.to_thread(self.on_secret_change)
            await self._stop_agent(leave=True)
            self._should_run, self._reason = True, None
            self.seeds = parsed.seeds
            await self._start_agent(parsed.seeds)
            membership = self.membership
            if membership is None or not membership.agent.running:
                raise OmxError("the serf agent did not restart; see the node log", status=503)
            try:
                joined = await asyncio.wait_for(membership.join(parsed.seeds), 30.0)
            except (MeshError, TimeoutError) as exc:
                raise PeerError(f"no seed of the token answered ({', '.join(parsed.seeds)}): {exc}") from exc
        return {"status": "joined", "node_id": self.node_id, "joined": joined, "seeds": list(parsed.seeds),
                "agent_restarted": True}

    async def leave(self) -> dict[str, Any]:
        """Leave gracefully; the agent stops and the node serves alone until the next join or start."""
        async with self._switch:
            if self.membership is None:
                return {"status": "standalone", "node_id": self.node_id, "left": False}
            self._should_run = False
            self._reason = "left the cluster (omx cluster leave): this node runs alone"
            await self._stop_agent(leave=True)
        self._publish_state()
        return {"status": "left", "node_id": self.node_id, "left": True}

    def ca_certificate(self) -> str:
        """The cluster CA (PEM), derived from the secret: the same on every member."""
        return cluster_ca(self.secret)[1].public_bytes(serialization.Encoding.PEM).decode()

    def join_token(self) -> str:
        topo = self.topology
        assert topo is not None
        return JoinToken(seeds=(topo.p2p_address,), secret=self.secret).encode()

    # ------------------------------------------------------------ background work

    async def _follow_members(self, membership: Membership) -> None:
        sub = membership.subscribe(maxsize=4096)
        try:
            for state in membership.members():
                self._maybe_fetch(state.name, state.tags, state.status)
            async for event in sub:
                if isinstance(event, MemberChanged):
                    self._member_changed(event)
        except MeshError as exc:  # fell behind: resubscribe from the current view
            log.info("membership follower restarts: %s", exc)
            self._spawn(self._follow_members(membership), "membership-follower")
        finally:
            sub.close()

    def _member_changed(self, event: MemberChanged) -> None:
        after = event.after
        if after is None:
            self.peers.forget(event.name)
            if event.before is not None:
                self._publish_member("removed", self._record(event.before))
            self._changed()
            return
        self._publish_member(event.kind, self._record(after))
        self._maybe_fetch(after.name, after.tags, after.status)
        self._changed()

    def _maybe_fetch(self, name: str, tags: Any, status: str, force: bool = False) -> None:
        if name == self.node_id or status != "alive" or "api" not in tags:
            return
        cached = self.peers.get(name)
        if not force and cached is not None and cached.error is None and cached.version == tags.get("inv"):
            return
        task = self.peers.fetch(name, tags["api"])
        task.add_done_callback(lambda t: self._fetched(name, t, cached))

    def _fetched(self, name: str, task: asyncio.Task[Any], before: Any) -> None:
        if task.cancelled() or task.exception() is not None or self.membership is None:
            return
        inv = task.result()
        if before is not None and inv is not None and (before.models, before.version) == (inv.models, inv.version):
            return
        self._changed()
        state = self.membership.view.get(name)
        if state is not None:
            self._publish_member("updated", self._record(state))

    async def _refresh_peers(self) -> None:
        while True:
            await asyncio.sleep(PEER_REFRESH_S)
            if self.membership is not None:
                due = self.peers.due(members := self.membership.members(), time.time())
                for state in members:
                    self._maybe_fetch(state.name, state.tags, state.status, force=state.name in due)

    async def _inventory_changed(self) -> None:
        await self._publish_tags({"inv": self.local.version})
        self._publish_member("updated", self._self_record())
        self._changed()

    async def publish_functions(self, version: str) -> None:
        """Gossip a new function-table digest (peers pull this node's table only when it changes)."""
        self.functions_version = version
        await self._publish_tags({"fn": version})

    def functions_version_of(self, node: str) -> str | None:
        """The function-table digest an alive member gossips (None: unknown or none published)."""
        return (self._alive_tags(node) or {}).get("fn") or None

    async def _publish_tags(self, tags: dict[str, str]) -> None:
        if (membership := self.membership) is not None and membership.agent.running:
            try:
                await membership.update_tags(tags)
            except (MeshError, OSError) as exc:
                log.warning("could not publish the tags %s: %s", ", ".join(tags), exc)

    async def _monitor(self) -> None:
        while True:
            self._publish_state()
            pid = self.membership.agent.pid if self.membership is not None else None
            if pid != self._agent_pid:
                self._agent_pid = pid
                if self.on_agent_change is not None:
                    self.on_agent_change()
            await asyncio.sleep(2.0)  # membership and inventory changes publish the node state at once

    def _publish_state(self) -> None:
        k = (self._should_run, m.agent.state, m.agent.running, len(m.view.alive())) if (m := self.membership) else None
        if k is not None and self._last_state is not None and k == self._last_state[0]:  # health_services builds
            return  # every member's record: only when this cheap key moved
        state = health_services(self)
        if self._last_state is None or state != self._last_state[1]:
            self.bus.publish(NodeStateChanged(self.node_id, state, time.time()))
        self._last_state = (k, state)

    def _publish_member(self, change: str, record: NodeRecord) -> None:
        self.bus.publish(MemberUpdate(change, record, time.time()))  # type: ignore[arg-type]

    def _request_done(self, done: RequestDone) -> None:
        self._requests += 1
        self.metrics.request_done(done)
        if done.handler in STORE_CHANGING_HANDLERS:
            self.local.poke()

    # ------------------------------------------------------------ ClusterView

    def _record(self, state: Any) -> NodeRecord:
        return member_record(state, self_id=self.node_id, self_models=self._self_models(),
                             self_version=self.local.version, self_resources=self.sampler.latest,
                             peers=self.peers.cache, self_sizes=self._self_sizes())

    def _self_models(self) -> tuple[str, ...]:
        return tuple(m["name"] for m in self.local.models)

    def _self_sizes(self) -> dict[str, int]:
        return {m["name"]: int(m.get("size") or 0) for m in self.local.models}

    def _self_record(self) -> NodeRecord:
        membership = self.membership
        state = membership.view.get(self.node_id) if membership is not None and membership.agent.running else None
        if state is not None:
            return self._record(state)
        topo = self.topology
        return NodeRecord(id=self.node_id, name=self.settings.node.name, status="alive",
                          address=topo.api_address if topo else None,
                          p2p_address=None, models=self._self_models(),
                          inventory_version=self.local.version, resources=self.sampler.latest,
                          is_self=True, last_change=time.time(), model_sizes=self._self_sizes())

    def agent(self) -> AgentFacts:
        membership = self.membership
        agent = membership.agent if membership is not None else None
        running = agent is not None and agent.running
        return AgentFacts(
            mode="serf" if self._should_run else "standalone", running=running, should_run=self._should_run,
            serf_version=self.serf_version, restarts=self._restarts_before + (agent.restarts if agent else 0),
            gossip_address=self.topology.p2p_address if self.topology else None,
            state=agent.state if agent is not None else "stopped", reason=self._reason,
            pid=agent.pid if agent is not None else None)

    def members(self) -> list[NodeRecord]:
        membership = self.membership
        if membership is None or not membership.agent.running:
            return [self._self_record()]
        records = [self._record(s) for s in membership.members()]
        records.sort(key=lambda r: (not r.is_self, r.id))
        if not records or not records[0].is_self:
            records.insert(0, self._self_record())
        return records

    def resources(self) -> Resources:
        return self.sampler.latest

    def peer_address(self, node_id: str) -> str | None:
        """Where an alive member serves its peer endpoints (its transfer listener, else its API), from its tags."""
        return self.addresses.peer(node_id)

    def peer_h3_address(self, node_id: str) -> str | None:
        """Where an alive member serves HTTP/3 (``peer.transport: http3``); None when it does not."""
        return self.addresses.h3(node_id)

    def counters(self) -> Counters:
        return Counters(self._requests, self._ws, dict(self._model_requests), self.metrics.routed_counts(),
                        model_tokens=dict(self._model_tokens))

    def connections(self) -> int:
        return self.sampler.current_connections()

    def api_address(self) -> str:
        return self.topology.api_address if self.topology else ""

    def events(self) -> EventMessages:
        return EventMessages(self)

    def _ws_opened(self, delta: int) -> None:
        self._ws += delta

    async def inventory(self) -> dict[str, Any]:
        res = self.sampler.latest
        return {"node_id": self.node_id, **self.local.to_json(),
                "resources": {"cpu": res.cpu, "memory": res.memory, "disk": res.disk}}

    def cluster_snapshot(self) -> ClusterSnapshot:
        """Every known member with its last known holdings, this node first-hand (cheap, no I/O but a statvfs)."""
        membership = self.membership
        members = membership.members() if membership is not None and membership.agent.running else []
        return snapshot_of(self.node_id, self.local.current(), members, self.peers.cache)

    def _changed(self) -> None:
        self._publish_state()  # membership or inventories moved: the node state event goes out now
        for listener in self.change_listeners:
            listener()

    async def publish_inventory(self) -> None:
        """Rescan the store now and gossip the new inventory version if it changed."""
        if await self.local.refresh():
            await self._inventory_changed()

    def _alive_tags(self, node: str) -> Any:
        return self.addresses.tags(node)

    def api_of(self, node: str) -> str | None:
        """``host:port`` of an alive member's API (None when it is not alive or unknown)."""
        if node == self.node_id:
            return self.api_address() or None
        tags = self._alive_tags(node)
        return str(tags["api"]) if tags is not None and "api" in tags else None

    async def refresh_peer(self, node: str) -> None:
        """Fetch ``node``'s inventory now, whatever its version tag says."""
        api = self.api_of(node)
        if node == self.node_id or api is None:
            return
        inv = await self.peers.fetch(node, api)
        if inv is not None and inv.error is not None:
            raise PeerError(f"inventory of {node} not fetched: {inv.error}")

    async def prometheus(self) -> tuple[bytes, str]:
        loaded = self.scheduler.loaded()
        counts: dict[str, int] = {}
        for record in self.members():
            counts[record.status] = counts.get(record.status, 0) + 1
        facts = self.agent()
        self.metrics.set_live(LiveFacts(
            in_flight=self.dispatcher.in_flight, queued=self.scheduler.queued,
            active=sum(m.active_requests for m in loaded), loaded_models=len(loaded), members=counts,
            agent_up=facts.running, agent_restarts=facts.restarts, websocket_connections=self._ws,
            inventory_models=len(self.local.models)))
        return await asyncio.to_thread(self.metrics.render)

    # ------------------------------------------------------------ UsageSink

    def model_request(self, model: str, *, prompt_tokens: int, generated_tokens: int) -> None:
        self._model_requests[model] = self._model_requests.get(model, 0) + 1
        self._model_tokens[model] = self._model_tokens.get(model, 0) + generated_tokens
        self.meta.touch(model, time.time())  # last_used: eviction order, and when a demand copy goes idle
        self.metrics.model_request(model, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens)

    @property
    def serf_state_dir(self) -> Path:
        return self.settings.home / "cluster" / "serf"
