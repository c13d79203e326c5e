"""What the cluster handlers see of the node's cluster service.

The runtime implements :class:`ClusterView` and hands it over as
``Services.cluster``; the handlers in
:mod:`omx.functions.builtin.cluster` only ever see this protocol and the
frozen facts below, never the Serf agent or the runtime. The wire shapes of
the cluster endpoints are built here from those facts (pure functions), so the
runtime and the handlers agree on them in one place.

``Services.usage`` optionally holds a :class:`UsageSink` that the inference
path tells about every model request it served (token counts feed
``/metrics``, per-model request counts feed ``/api/distributed/status``), and
``Services.transfer_stats`` a :class:`ServedBytes` told about peer transfers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from omx.errors import OmxError
from omx.timefmt import iso_time

__all__ = [
    "AgentFacts",
    "ClusterView",
    "Counters",
    "NodeRecord",
    "Resources",
    "ServedBytes",
    "UsageSink",
    "cluster_view",
    "node_json",
    "resources_json",
]

MembershipMode = Literal["serf", "standalone"]


@dataclass(frozen=True)
class Resources:
    """Resource use of one node: fractions in [0, 1] plus absolute bytes."""

    cpu: float
    memory: float
    disk: float
    cpu_count: int = 0
    memory_used: int = 0
    memory_total: int = 0
    disk_used: int = 0
    disk_total: int = 0


def resources_json(res: Resources | None, *, full: bool = False) -> dict[str, Any] | None:
    """The fractions (and with ``full`` the absolute figures) of ``res``."""
    if res is None:
        return None
    out: dict[str, Any] = {"cpu": round(res.cpu, 4), "memory": round(res.memory, 4), "disk": round(res.disk, 4)}
    if full:
        out.update(cpu_count=res.cpu_count, memory_used=res.memory_used, memory_total=res.memory_total,
                   disk_used=res.disk_used, disk_total=res.disk_total)
    return out


@dataclass(frozen=True)
class NodeRecord:
    """One member of the cluster as this node sees it.

    ``status`` is Serf's (``alive``/``suspect``/``failed``/``left``);
    ``models`` comes from the member's inventory (empty until fetched);
    ``resources`` is ``None`` when unknown (unreachable peer).
    """

    id: str
    name: str | None
    status: str
    address: str | None
    p2p_address: str | None
    models: tuple[str, ...]
    inventory_version: str
    resources: Resources | None
    is_self: bool
    last_change: float
    model_sizes: Mapping[str, int] = field(default_factory=dict)
    """Bytes of each model in ``models``, where known."""


def node_json(rec: NodeRecord) -> dict[str, Any]:
    """A node object of ``/api/distributed/nodes`` and of the event stream."""
    return {
        "id": rec.id,
        "name": rec.name,
        "status": rec.status,
        "address": rec.address,
        "p2p_address": rec.p2p_address,
        "models": list(rec.models),
        "model_sizes": dict(rec.model_sizes),
        "inventory_version": rec.inventory_version,
        "resources": resources_json(rec.resources),
        "self": rec.is_self,
        "last_change": iso_time(rec.last_change),
    }


@dataclass(frozen=True)
class AgentFacts:
    """The state of the node's membership agent.

    ``mode`` is ``serf`` while this node takes part in gossip (or should:
    ``should_run`` with ``running`` false means the agent is down and being
    restarted) and ``standalone`` when there is no Serf binary or the node
    left its cluster. ``reason`` explains a standalone mode.
    """

    mode: MembershipMode
    running: bool
    should_run: bool
    serf_version: str | None
    restarts: int
    gossip_address: str | None
    state: str
    reason: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class Counters:
    """Request counters since the node started."""

    requests_processed: int
    websocket_connections: int
    model_requests: Mapping[str, int] = field(default_factory=dict)
    routed_requests: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Model-routed requests this node took in, by model, then by the node that served them
    (``omx_routed_requests_total``)."""
    model_tokens: Mapping[str, int] = field(default_factory=dict)
    """Tokens this node generated, by model (``omx_generated_tokens_total``)."""


class UsageSink(Protocol):
    """Told about each model request the node served."""

    def model_request(self, model: str, *, prompt_tokens: int, generated_tokens: int) -> None:
        ...


class ServedBytes(Protocol):
    """Told how many chunk bytes each peer response actually sent."""

    def bytes_served(self, n: int) -> None:
        ...


class ClusterView(Protocol):
    """The node's cluster service as the handlers use it."""

    def agent(self) -> AgentFacts:
        """Membership agent state (cheap, no I/O)."""
        ...

    def members(self) -> Sequence[NodeRecord]:
        """Every known member, this node first (cheap, no I/O)."""
        ...

    def resources(self) -> Resources:
        """This node's resources (sampled in the background)."""
        ...

    def counters(self) -> Counters:
        ...

    def connections(self) -> int:
        """Open client connections on the API port."""
        ...

    def api_address(self) -> str:
        """The advertised API address (``ip:port``)."""
        ...

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """The live event stream's messages: a snapshot first, then changes and ticks.

        Ends when the node shuts down; closing it unsubscribes.
        """
        ...

    async def inventory(self) -> dict[str, Any]:
        """This node's inventory (models held, with a version) for peers."""
        ...

    async def prometheus(self) -> tuple[bytes, str]:
        """``/metrics`` body and content type."""
        ...

    async def join(self, token: str) -> dict[str, Any]:
        """Adopt the token's secret (persisted), restart the agent with it and join its seeds."""
        ...

    async def leave(self) -> dict[str, Any]:
        """Leave the cluster gracefully; the node keeps serving alone."""
        ...

    def join_token(self) -> str:
        """A join token for this node's cluster (seed: this node's gossip address)."""
        ...

    def ca_certificate(self) -> str:
        """The cluster CA certificate (PEM): what HTTP/3 clients trust."""
        ...


def cluster_view(view: ClusterView | None) -> ClusterView:
    """``view`` (a node's ``Services.cluster``), or an error saying the node has none."""
    if view is None:
        raise OmxError("this node runs without a cluster service", status=503)
    return view
