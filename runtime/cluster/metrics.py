"""Prometheus metrics of one node, in the node's own :class:`CollectorRegistry`.

Counters move as requests finish (the dispatcher reports each one) and as
models serve requests (the inference path's usage sink); gauges are set from
live facts just before each scrape; store figures (blobs, chunk indexes and
the chunks they list, partial blobs) are read from disk at scrape time, in a
thread, with chunk counts cached per index file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omx.functions.dispatch import RequestDone

__all__ = ["LiveFacts", "NodeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_MEMBER_STATUSES = ("alive", "suspect", "leaving", "left", "failed")


@dataclass(frozen=True)
class LiveFacts:
    """Gauge values read on the event loop just before a scrape."""

    in_flight: int
    queued: int
    active: int
    loaded_models: int
    members: Mapping[str, int]
    agent_up: bool
    agent_restarts: int
    websocket_connections: int
    inventory_models: int


class NodeMetrics:
    """The node's metrics; :meth:`render` produces the text exposition (blocking: run in a thread)."""

    def __init__(self, store_root: Path) -> None:
        self.store_root = store_root
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("omx_http_requests", "HTTP requests handled, by handler and status",
                                ("handler", "status"), registry=r)
        self.latency = Histogram("omx_http_request_duration_seconds",
                                 "Time from request arrival to its last byte, by handler and status",
                                 ("handler", "status"), buckets=_LATENCY_BUCKETS, registry=r)
        self.model_requests = Counter("omx_model_requests", "Model requests served, by model", ("model",),
                                      registry=r)
        self.generated_tokens = Counter("omx_generated_tokens", "Tokens generated, by model", ("model",),
                                        registry=r)
        self.prompt_tokens = Counter("omx_prompt_tokens", "Prompt tokens evaluated, by model", ("model",),
                                     registry=r)
        self.in_flight = Gauge("omx_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.queue_depth = Gauge("omx_scheduler_queue_depth", "Requests waiting for a model slot", registry=r)
        self.active = Gauge("omx_scheduler_active_requests", "Requests running on a loaded model", registry=r)
        self.loaded = Gauge("omx_models_loaded", "Models loaded in memory", registry=r)
        self.models_held = Gauge("omx_models_held", "Models in this node's store", registry=r)
        self.members = Gauge("omx_cluster_members", "Cluster members by Serf status", ("status",), registry=r)
        self.agent_up = Gauge("omx_serf_agent_up", "1 while the Serf agent runs", registry=r)
        self.agent_restarts = Gauge("omx_serf_agent_restarts", "Serf agent restarts after crashes", registry=r)
        self.websockets = Gauge("omx_websocket_connections", "Open event-stream WebSockets", registry=r)
        self.blobs = Gauge("omx_store_blobs", "Complete blobs in the writable store", registry=r)
        self.blob_bytes = Gauge("omx_store_blob_bytes", "Bytes of complete blobs in the writable store", registry=r)
        self.chunk_indexes = Gauge("omx_store_chunk_indexes", "Blob chunk indexes held", registry=r)
        self.chunks = Gauge("omx_store_chunks", "Chunks listed by the chunk indexes held", registry=r)
        self.partial_blobs = Gauge("omx_store_partial_blobs", "Partial blobs being fetched", registry=r)
        self.replication_received = Counter(
            "omx_replication_bytes_received", "Blob bytes received, by source (peer, registry, local copy)",
            ("source",), registry=r)
        for source in ("peer", "registry", "local"):
            self.replication_received.labels(source)
        self.replication_served = Counter("omx_replication_bytes_served", "Chunk bytes served to peers",
                                          registry=r)
        self.chunks_rejected = Counter("omx_replication_chunks_rejected",
                                       "Chunks received that failed BLAKE3 verification", registry=r)
        self.transfers_active = Gauge("omx_replication_transfers_active", "Blob transfers from peers under way",
                                      registry=r)
        self.routed_requests = Counter("omx_routed_requests", "Model-routed requests this node took in, by model "
                                       "and the node that served them", ("model", "node"), registry=r)
        self.route_retries = Counter("omx_route_retries", "Model-routed requests tried again on another node "
                                     "after their node failed before answering", registry=r)
        self.peer_bytes = Counter(
            "omx_peer_bytes", "Bytes of the peer requests this node made (chunk transfers, manifests, forwarded "
            "calls), by transport (h1: TCP, h3: QUIC) and direction (sent: request bodies, received: answers)",
            ("transport", "direction"), registry=r)
        for transport in ("h1", "h3"):
            for direction in ("sent", "received"):
                self.peer_bytes.labels(transport, direction)
        self.sync_fetches = Counter(
            "omx_peer_sync_fetches", "Requests this node made to keep its view of the peers (inventory, "
            "functions: function tables, load: load reports), by kind", ("kind",), registry=r)
        self.sync_bytes = Counter("omx_peer_sync_bytes", "Bytes of the answers to those requests, by kind",
                                  ("kind",), registry=r)
        for kind in ("inventory", "functions", "load"):
            self.sync_fetches.labels(kind)
            self.sync_bytes.labels(kind)
        self._chunk_cache: dict[str, tuple[int, int]] = {}

    def request_done(self, done: RequestDone) -> None:
        status = str(done.status)
        self.requests.labels(done.handler, status).inc()
        self.latency.labels(done.handler, status).observe(done.seconds)

    def model_request(self, model: str, *, prompt_tokens: int, generated_tokens: int) -> None:
        self.model_requests.labels(model).inc()
        if prompt_tokens > 0:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if generated_tokens > 0:
            self.generated_tokens.labels(model).inc(generated_tokens)

    # Replication traffic: a TransferObserver for peer transfers, a ServedBytes sink for the
    # peer chunk endpoints, and the registry pull's byte hook.

    def bytes_received(self, source: str, n: int) -> None:
        self.replication_received.labels(source).inc(n)

    def registry_bytes(self, n: int) -> None:
        self.replication_received.labels("registry").inc(n)

    def bytes_served(self, n: int) -> None:
        self.replication_served.inc(n)

    def peer_traffic(self, transport: str, direction: str, n: int) -> None:
        """Bytes of a peer request this node made (``transport``: h1 or h3; ``direction``: sent or received)."""
        if n > 0:
            self.peer_bytes.labels(transport, direction).inc(n)

    def peer_sync(self, kind: str, n: int) -> None:
        """One answered request of the peer view (``kind``: inventory, functions or load) of ``n`` bytes."""
        self.sync_fetches.labels(kind).inc()
        self.sync_bytes.labels(kind).inc(n)

    def chunk_rejected(self, source: str) -> None:
        self.chunks_rejected.inc()

    def transfer_started(self) -> None:
        self.transfers_active.inc()

    def transfer_finished(self) -> None:
        self.transfers_active.dec()

    # Routing: a RouteObserver for the router.

    def routed(self, model: str, node: str) -> None:
        self.routed_requests.labels(model, node).inc()

    def retried(self) -> None:
        self.route_retries.inc()

    def routed_counts(self) -> dict[str, dict[str, int]]:
        """``omx_routed_requests_total`` by model, then by the node that served them."""
        out: dict[str, dict[str, int]] = {}
        for family in self.routed_requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out.setdefault(sample.labels["model"], {})[sample.labels["node"]] = int(sample.value)
        return out

    def set_live(self, facts: LiveFacts) -> None:
        self.in_flight.set(facts.in_flight)
        self.queue_depth.set(facts.queued)
        self.active.set(facts.active)
        self.loaded.set(facts.loaded_models)
        self.models_held.set(facts.inventory_models)
        for status in {*_MEMBER_STATUSES, *facts.members}:
            self.members.labels(status).set(facts.members.get(status, 0))
        self.agent_up.set(1 if facts.agent_up else 0)
        self.agent_restarts.set(facts.agent_restarts)
        self.websockets.set(facts.websocket_connections)

    def _scan_store(self) -> None:
        blobs = blob_bytes = 0
        blob_dir = self.store_root / "blobs"
        if blob_dir.is_dir():
            for entry in os.scandir(blob_dir):
                if entry.name.startswith("sha256-") and entry.is_file():
                    blobs += 1
                    blob_bytes += entry.stat().st_size
        indexes = chunks = 0
        seen = set()
        chunk_dir = self.store_root / "chunks"
        if chunk_dir.is_dir():
            for entry in os.scandir(chunk_dir):
                if not entry.name.endswith(".json"):
                    continue
                indexes += 1
                seen.add(entry.path)
                chunks += self._chunk_count(entry.path, entry.stat().st_mtime_ns)
        for stale in set(self._chunk_cache) - seen:
            del self._chunk_cache[stale]
        partial_dir = self.store_root / "partial"
        partial = sum(1 for p in partial_dir.iterdir() if not p.name.startswith(".")) if partial_dir.is_dir() else 0
        self.blobs.set(blobs)
        self.blob_bytes.set(blob_bytes)
        self.chunk_indexes.set(indexes)
        self.chunks.set(chunks)
        self.partial_blobs.set(partial)

    def _chunk_count(self, path: str, mtime: int) -> int:
        cached = self._chunk_cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            with open(path, "rb") as fh:
                count = len(json.load(fh).get("chunks", []))
        except (OSError, ValueError, AttributeError):
            count = 0
        self._chunk_cache[path] = (mtime, count)
        return count

    def render(self) -> tuple[bytes, str]:
        """Scan the store and render every metric (blocking)."""
        self._scan_store()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
