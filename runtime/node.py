"""A node: the wiring of store, engine, scheduler, handlers and server.

This file only assembles parts; each part lives in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import omx
from omx.errors import ConfigError
from omx.fsutil import atomic_write
from omx.functions.builtin import builtin_registry, pull
from omx.functions.call import EngineDefaults, NodeInfo, Services
from omx.functions.dispatch import Dispatcher
from omx.functions.holding import HoldingQueue
from omx.functions.router import Router
from omx.processes import start_ticks
from omx.runtime.app import build_app
from omx.runtime.cluster import ClusterService
from omx.runtime.cluster.peer_http import PeerHttp
from omx.runtime.cluster.peer_link import CONNECT_TIMEOUT_S, HttpPeerLink
from omx.runtime.config import Settings
from omx.runtime.engine import make_engine
from omx.runtime.functions_host import FunctionsHost, function_host
from omx.runtime.identity import load_or_create_node_id
from omx.runtime.peer import Bandwidth, HttpPeerTransport, Transfers, TransferSettings
from omx.runtime.peer.h3 import H3PeerClient
from omx.runtime.peer.wire import WireClient
from omx.runtime.registry_http import HttpxRegistryTransport
from omx.runtime.replication import PeerCommands, ReplicationService, ReplicationSettings, Replicator
from omx.runtime.replication.demand import DemandReplicas
from omx.runtime.scheduler import ModelScheduler
from omx.runtime.server import H3Listener, Listener, bind_tcp, bind_udp, serve_app, serve_transfers
from omx.runtime.tls import TlsFiles, ensure_tls, tls_dir
from omx.runtime.web import DashboardApp
from omx.storage import ModelStore

__all__ = ["Node", "NodeReady", "run_node"]

log = logging.getLogger("omx.node")


@dataclass(frozen=True)
class NodeReady:
    """Facts about a node that has started serving."""

    node_id: str
    url: str
    api_port: int
    web_port: int | None
    p2p_port: int | None
    config_path: Path | None
    h3_port: int | None = None
    """UDP port of HTTP/3 (``None`` when ``api.http3`` is off)."""


class Node:
    """One omx node. ``start()`` binds and wires; ``serve()`` runs until stopped."""

    def __init__(self, settings: Settings, *, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.node_id = load_or_create_node_id(settings.home)
        self.store = ModelStore(settings.store_path, chunk_size=settings.models.chunk_size,
                                extra_roots=tuple(settings.models.extra_stores))
        engine_cfg = settings.engine
        self.engine = make_engine(engine_cfg.backend, num_thread=engine_cfg.num_thread, num_gpu=engine_cfg.num_gpu,
                                  batching=engine_cfg.batching, kv_unified=engine_cfg.kv_unified,
                                  max_sequences=engine_cfg.max_sequences)
        self.scheduler = ModelScheduler(
            self.engine,
            max_loaded_models=engine_cfg.max_loaded_models,
            num_parallel=engine_cfg.num_parallel,
            max_queue=engine_cfg.max_queue,
            default_keep_alive=engine_cfg.keep_alive,
        )
        self.registry_transport = HttpxRegistryTransport()
        security = settings.security
        self.registry = builtin_registry(metrics_public=security.metrics_public)
        self.dispatcher = Dispatcher(api_keys=security.api_keys, admin_keys=security.admin_keys,
                                     trusted_proxies=security.trusted_proxies)
        # Resolves the cluster secret now: a bad token or a join without a secret fails before binding.
        # OMX_SERF_BINARY (like OMX_HOME, a flat variable) names another serf executable; troubleshoot reads it too.
        self.cluster = ClusterService(settings, self.node_id, self.store, self.scheduler, self.dispatcher,
                                      serf_binary=os.environ.get("OMX_SERF_BINARY") or "serf")
        self.listener: Listener | None = None
        self.transfer_listener: Listener | None = None
        self.h3_listener: Listener | None = None
        self.web_listener: Listener | None = None
        self.services: Services | None = None
        self.app: Any = None
        # peer.transport http3: chunks and forwarded calls go over QUIC to the peers' HTTP/3 listeners,
        # verified against the cluster CA (written under $OMX_HOME/tls/ before any peer is contacted).
        h3 = settings.peer.transport == "http3"
        on_bytes = self.cluster.metrics.peer_traffic
        self.peer_transport = HttpPeerTransport(
            self.node_id, key=lambda: self.cluster.secret.peer_auth_key(),
            resolve=self.cluster.peer_h3_address if h3 else self.cluster.peer_address,
            client=H3PeerClient(tls_dir(settings.home) / "ca.crt") if h3 else None, on_bytes=on_bytes,
            fallback=(WireClient(), self.cluster.peer_address) if h3 else None)  # a peer with HTTP/3 off
        self.transfers = Transfers(self.store.blobs, self.peer_transport,
                                   settings=TransferSettings(concurrency=settings.models.concurrency),
                                   bandwidth=Bandwidth(settings.replication.max_bandwidth),
                                   observer=self.cluster.metrics)
        """Blob transfers from peers (one per digest), for the replicator and pull."""
        self.replicator = Replicator(
            node_id=self.node_id, store=self.store, meta=self.cluster.meta, link=self.cluster,
            transfers=self.transfers,
            commands=PeerCommands(self.node_id, key=lambda: self.cluster.secret.peer_auth_key(),
                                  api_of=self.cluster.api_of),
            settings=ReplicationSettings(
                default_factor=settings.replication.factor, auto_cleanup=settings.models.auto_cleanup,
                max_cache_size=settings.models.max_cache_size, max_bandwidth=settings.replication.max_bandwidth,
                idle_after=settings.replication.idle_after))
        self.cluster.change_listeners.append(self.replicator.kick)
        self.peer_link = HttpPeerLink(self.node_id, key=lambda: self.cluster.secret.peer_auth_key(),
                                      api_of=self.cluster.peer_h3_address if h3 else self.cluster.api_of,
                                      snapshot=self.cluster.cluster_snapshot, on_bytes=on_bytes,
                                      on_sync=self.cluster.metrics.peer_sync,
                                      client=H3PeerClient(tls_dir(settings.home) / "ca.crt") if h3 else None,
                                      fast_of=None if h3 else self.cluster.peer_address,
                                      fallback=(PeerHttp(connect_timeout=CONNECT_TIMEOUT_S), self.cluster.api_of,
                                                self.cluster.peer_address) if h3 else None)
        self.router: Router | None = None
        """Model-routed calls go to the best holder through it (made in :meth:`bind`)."""

    def bind(self) -> Listener:
        self.listener = bind_tcp(self.settings.api.host, self.settings.api.port)
        self.transfer_listener = bind_tcp(self.settings.api.host, self.settings.p2p.transfer_port,
                                          what="transfer", key="p2p.transfer_port")
        self.h3_listener = self._bind_h3(self.listener)
        if self.settings.web.enabled:
            self.web_listener = bind_tcp(self.settings.api.host, self.settings.web.port, what="web", key="web.port")
        self.services = Services(
            store=self.store,
            scheduler=self.scheduler,
            node=NodeInfo(node_id=self.node_id, version=omx.__version__, name=self.settings.node.name,
                          api_url=self.listener.url, web_url=self.web_listener.url if self.web_listener else None),
            defaults=EngineDefaults(
                keep_alive=self.settings.engine.keep_alive,
                num_ctx=self.settings.engine.num_ctx,
                num_thread=self.settings.engine.num_thread,
                num_parallel=self.settings.engine.num_parallel,
            ),
        )
        self.services.cluster = self.cluster
        self.services.usage = self.cluster
        self.services.transfer_stats = self.cluster.metrics
        self.services.replication = ReplicationService(self.replicator)
        holding = HoldingQueue(timeout_s=self.settings.routing.queue_timeout,
                               max_waiting=self.settings.engine.max_queue)
        self.router = router = Router(self.node_id, self.peer_link, self.services, observer=self.cluster.metrics,
                                      holding=holding)
        router.demand = DemandReplicas(self.replicator, lambda n: router.node_load(n),
                                       max_factor=self.settings.replication.max_factor)
        self.replicator.in_use = router.busy_models
        self.services.router = self.dispatcher.router = router
        self.functions: FunctionsHost = function_host(
            self.node_id, self.settings.home, self.registry, self.dispatcher, lambda: self.services,
            self.peer_link, self._alive_peers, self.cluster.metrics.registry,
            on_sync=self.cluster.metrics.peer_sync, publish=self.cluster.publish_functions,
            peer_version=self.cluster.functions_version_of)
        self.services.functions = self.functions
        self.cluster.change_listeners.append(self.functions.kick)
        models = self.settings.models
        self.services.registry = pull.make_registry_client(
            self.store, self.registry_transport, default_registry=models.registry, insecure=models.insecure,
            concurrency=models.concurrency, download_timeout=models.download_timeout,
            on_bytes=self.cluster.metrics.registry_bytes)
        self.app = build_app(self.registry, self.services, self.dispatcher, lifespan=self._lifespan)
        return self.listener

    def _alive_peers(self) -> list[str]:
        """Alive members but this node, from the membership view (not the full records: it runs every 10 s)."""
        membership = self.cluster.membership
        if membership is None or not membership.agent.running:
            return []
        return [m.name for m in membership.view.alive() if m.name != self.node_id]

    def _bind_h3(self, tcp: Listener) -> Listener | None:
        """The QUIC socket: ``api.h3_port``, else the API's port number (any free one if that is taken
        and the API port was chosen by the system); ``None`` when ``api.http3`` is off."""
        api = self.settings.api
        if not api.http3:
            return None
        if api.h3_port is not None:
            return bind_udp(tcp.host, api.h3_port)
        try:
            return bind_udp(tcp.host, tcp.port, key="api.port")
        except ConfigError:
            if api.port != 0:
                raise
            return bind_udp(tcp.host, 0)

    def _ensure_tls(self) -> TlsFiles:
        """Write the cluster CA and this node's leaf (names: the bind and advertised addresses)."""
        topo = self.cluster.topology
        api = self.settings.api
        hosts = [api.host, *([api.advertise] if api.advertise else []),
                 *([topo.api_address.rsplit(":", 1)[0]] if topo else [])]
        return ensure_tls(self.settings.home, self.cluster.secret, self.node_id, hosts)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.scheduler.aclose()
            await self.registry_transport.aclose()

    @property
    def ready(self) -> NodeReady:
        assert self.listener is not None
        topo = self.cluster.topology
        return NodeReady(node_id=self.node_id, url=self.listener.url, api_port=self.listener.port,
                         web_port=self.web_listener.port if self.web_listener else None,
                         p2p_port=topo.p2p_port if topo else None, config_path=self.config_path,
                         h3_port=self.h3_listener.port if self.h3_listener else None)

    def _write_node_json(self) -> Path:
        """Write ``run/node.json`` (pid and its start time, ports, gossip address, agent pid) for the CLI.

        ``start_ticks`` lets ``omx stop`` tell this process from a later one that reuses its pid.
        """
        run_dir = self.settings.run_dir
        ready = self.ready
        agent = self.cluster.agent()
        info = {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid()),
                "url": ready.url, "host": self.settings.api.host,
                "api_port": ready.api_port, "web_port": ready.web_port, "p2p_port": ready.p2p_port,
                "p2p_address": agent.gossip_address, "serf": agent.running, "serf_pid": agent.pid,
                "node_id": ready.node_id,
                "transfer_port": self.transfer_listener.port if self.transfer_listener else None,
                "h3_port": self.h3_listener.port if self.h3_listener else None}
        path = run_dir / "node.json"
        atomic_write(path, json.dumps(info, indent=2) + "\n")
        return path

    async def serve(self, stop: asyncio.Event, *, on_ready: Callable[[NodeReady], None] | None = None) -> None:
        listener = self.listener or self.bind()
        await asyncio.to_thread(self.store.recover)
        transfer, web = self.transfer_listener, self.web_listener
        assert transfer is not None
        h3_sock = self.h3_listener
        await self.cluster.start(listener.host, listener.port, transfer.port,
                                 h3_port=h3_sock.port if h3_sock else None)
        tls = await asyncio.to_thread(self._ensure_tls)
        self.cluster.on_secret_change = self._ensure_tls
        h3 = H3Listener(h3_sock, tls) if h3_sock is not None else None
        path = self._write_node_json()
        self.cluster.on_agent_change = self._write_node_json
        self.replicator.start()
        assert self.router is not None
        self.router.start()
        await self.functions.start()
        if on_ready is not None:
            on_ready(self.ready)

        async def shutdown() -> None:
            await stop.wait()
            self.cluster.bus.close()  # ends event streams so open WebSockets do not hold the shutdown

        try:
            async with asyncio.TaskGroup() as servers:
                servers.create_task(serve_transfers(self.app, transfer, stop.wait), name="transfer-listener")
                if web is not None:
                    servers.create_task(serve_app(DashboardApp(self.app), web, stop.wait), name="web-listener")
                await serve_app(self.app, listener, shutdown, h3=h3)
        finally:
            self.cluster.on_agent_change = None
            await self.router.aclose()
            await self.functions.aclose()
            await self.peer_link.aclose()
            await self.replicator.stop()
            await self.transfers.aclose()
            await self.peer_transport.aclose()
            transfer.sock.close()
            if web is not None:
                web.sock.close()
            await self.cluster.stop(leave=True)
            with contextlib.suppress(OSError):
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
            listener.sock.close()
            if h3_sock is not None:
                h3_sock.sock.close()


async def run_node(
    settings: Settings,
    *,
    on_ready: Callable[[NodeReady], None] | None = None,
    stop: asyncio.Event | None = None,
    config_path: Path | None = None,
) -> None:
    """Run a node until ``stop`` is set or the process gets SIGINT/SIGTERM."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    node = Node(settings, config_path=config_path)
    node.bind()
    try:
        await node.serve(stop, on_ready=on_ready)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
