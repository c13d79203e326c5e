"""What a handler receives besides its validated body: the node's services
and the facts of the HTTP call it serves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omx.protocols import Scheduler
from omx.types import NodeId

if TYPE_CHECKING:
    from omx.functions.cluster_view import ClusterView, ServedBytes, UsageSink
    from omx.functions.custom_view import CustomFunctions
    from omx.functions.registry import HandlerSpec
    from omx.functions.replication_view import ReplicationView
    from omx.functions.router import Router
    from omx.storage import ModelStore
    from omx.storage.registry import RegistryClient

__all__ = ["Call", "EngineDefaults", "NodeInfo", "Services"]


@dataclass(frozen=True)
class NodeInfo:
    node_id: NodeId
    version: str
    name: str | None = None
    started_at: float = field(default_factory=time.time)
    api_url: str = ""
    web_url: str | None = None
    """The dashboard's URL (``None`` when ``web.enabled`` is false)."""


@dataclass(frozen=True)
class EngineDefaults:
    """Engine settings handlers need when they build a load spec."""

    keep_alive: float = 300.0
    num_ctx: int = 4096
    num_batch: int = 512
    num_thread: int | None = None
    num_parallel: int = 1


@dataclass
class Services:
    """The node's parts that handlers reach, injected by the runtime.

    The optional parts are None on a node (or a test harness) built without them;
    the handlers that need one answer with a clear error then.
    """

    store: ModelStore
    scheduler: Scheduler
    node: NodeInfo
    defaults: EngineDefaults = field(default_factory=EngineDefaults)
    replication: ReplicationView | None = None
    """The replicator (placement, transfers, migrations, verify); None on nodes built without one."""
    cluster: ClusterView | None = None
    """The node's cluster service (membership, inventory, metrics, join and leave)."""
    usage: UsageSink | None = None
    """Told about every model request served (token counts, per-model request counts)."""
    registry: RegistryClient | None = None
    """The registry client behind pull and push."""
    transfer_stats: ServedBytes | None = None
    """Told how many chunk bytes each peer response sent."""
    router: Router | None = None
    """Routes model-routed calls to the best holder and answers the cluster-wide views; None alone."""
    functions: CustomFunctions | None = None
    """The custom function host (deploy, serve, distribute); None on nodes built without one."""


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


async def _never_disconnected() -> bool:
    return False


@dataclass
class Call:
    """One invocation of a handler."""

    services: Services
    spec: HandlerSpec
    method: str = "POST"
    path_params: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    client: str | None = None
    stream_body: Callable[[], AsyncIterator[bytes]] = _no_body
    is_disconnected: Callable[[], Awaitable[bool]] = _never_disconnected
    started: int = field(default_factory=time.perf_counter_ns)
    path: str = ""
    """The request path with its query string, as sent (what peer signatures cover)."""
    peer: str | None = None
    """The authenticated peer node, on peer endpoints and hop requests."""
    hop: bool = False
    """A peer forwarded this call (``X-Omx-Hop``, signed): answer it here, never forward it again."""
    body_bytes: bytes = b""
    """The request body as received, on model-routed calls (what forwarding sends on unchanged)."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers the adapter adds to the response, whatever it is (``X-Omx-Node`` on model-routed calls)."""
