"""What the replication handlers see of the node's replicator.

The runtime implements :class:`ReplicationView` (placement, transfers,
migrations, verify) and hands it to the handlers through
``Services.replication``; the handlers in
:mod:`omx.functions.builtin.replication` only see this protocol and the frozen
facts below. The wire shapes of the replication endpoints are built here from
those facts (pure functions), so every node answers with the same shapes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "MigrationState",
    "ModelPlacement",
    "PlanStep",
    "RebalanceStarted",
    "ReplicationSummary",
    "ReplicationView",
    "TransferFacts",
    "TransferState",
    "VerifyReport",
    "migration_json",
    "placement_json",
    "rebalance_json",
    "summary_json",
    "transfer_json",
    "verify_json",
]

ModelStatus = Literal["ready", "replicating", "under_replicated", "unavailable"]
MigrationStatus = Literal["started", "transferring", "completed", "failed"]
TransferState = Literal["queued", "running", "completed", "failed"]


@dataclass(frozen=True)
class ModelPlacement:
    """One model of the cluster: its factor, the alive nodes holding it complete, its status."""

    name: str
    factor: int
    nodes: tuple[str, ...]
    total_size: int
    status: ModelStatus


@dataclass(frozen=True)
class TransferFacts:
    """One blob on its way to a node."""

    model: str
    digest: str
    to: str
    sources: tuple[str, ...]
    bytes_done: int
    bytes_total: int
    state: TransferState
    error: str | None = None


@dataclass(frozen=True)
class ReplicationSummary:
    total_models: int
    replicated_models: int
    pending_replications: int
    failed_replications: int
    replication_health: Literal["healthy", "degraded", "critical"]
    transfers: tuple[TransferFacts, ...] = ()
    reconciles: int = 0
    """Reconcile rounds this node finished since it started (so a client can wait for one)."""


@dataclass(frozen=True)
class PlanStep:
    """A copy the cluster will add or drop."""

    action: Literal["add", "drop"]
    model: str
    node: str
    size: int = 0


@dataclass(frozen=True)
class RebalanceStarted:
    rebalance_id: str
    plan: tuple[PlanStep, ...]
    estimated_time: float
    """Seconds, from the bytes to move and the configured (or a nominal) bandwidth."""


@dataclass(frozen=True)
class MigrationState:
    migration_id: str
    model: str
    from_node: str
    to_node: str
    status: MigrationStatus
    progress: float
    error: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    checked_blobs: int
    checked_chunks: int
    damaged: int
    repaired: int
    unrepaired: int
    details: tuple[dict[str, Any], ...] = field(default_factory=tuple)


class ReplicationView(Protocol):
    """The replicator as handlers see it. Unknown models or nodes raise ``ModelNotFound``/``InvalidRequest``."""

    def placements(self) -> Sequence[ModelPlacement]:
        ...

    def summary(self) -> ReplicationSummary:
        ...

    async def set_factor(self, model: str, factor: int) -> ModelPlacement:
        ...

    async def rebalance(self) -> RebalanceStarted:
        ...

    async def migrate(self, model: str, from_node: str, to_node: str) -> MigrationState:
        ...

    def migration(self, migration_id: str) -> MigrationState | None:
        ...

    async def verify(self, model: str | None) -> VerifyReport:
        ...

    def peer_pull(self, model: str) -> AsyncIterator[dict[str, object]] | None:
        """Ollama pull progress for ``model`` fetched from peers; None when no alive peer holds it."""
        ...

    async def fetch_command(self, model: str, digest: str | None,
                            origin: Literal["user", "replica", "demand"]) -> AsyncIterator[dict[str, object]]:
        """A peer asks this node to fetch ``model`` (a migration target); progress objects, then success."""
        ...

    async def drop_command(self, model: str, digest: str, keeper: str) -> dict[str, object]:
        """A peer's migration asks this node to drop its copy once ``keeper`` holds it."""
        ...

    def kick(self) -> None:
        """Reconcile soon."""
        ...

    def forget(self, model: str) -> None:
        """A user deletes ``model`` from the cluster: place no copy of it anywhere for a while, fetch none here."""
        ...


# ------------------------------------------------------------------ wire shapes


def placement_json(p: ModelPlacement) -> dict[str, Any]:
    return {"name": p.name, "replicas": len(p.nodes), "factor": p.factor, "nodes": list(p.nodes),
            "total_size": p.total_size, "status": p.status}


def transfer_json(t: TransferFacts) -> dict[str, Any]:
    out: dict[str, Any] = {"model": t.model, "digest": t.digest, "to": t.to, "sources": list(t.sources),
                           "bytes_done": t.bytes_done, "bytes_total": t.bytes_total, "state": t.state}
    if t.error:
        out["error"] = t.error
    return out


def summary_json(s: ReplicationSummary) -> dict[str, Any]:
    return {"total_models": s.total_models, "replicated_models": s.replicated_models,
            "pending_replications": s.pending_replications, "failed_replications": s.failed_replications,
            "replication_health": s.replication_health, "transfers": [transfer_json(t) for t in s.transfers],
            "reconciles": s.reconciles}


def rebalance_json(r: RebalanceStarted) -> dict[str, Any]:
    return {"message": "Rebalance initiated", "status": "started", "rebalance_id": r.rebalance_id,
            "plan": [{"action": s.action, "model": s.model, "node": s.node, "size": s.size} for s in r.plan],
            "estimated_time": f"{r.estimated_time:.0f}s", "estimated_seconds": round(r.estimated_time, 3)}


def migration_json(m: MigrationState) -> dict[str, Any]:
    return {"migration_id": m.migration_id, "model_name": m.model, "from_node": m.from_node,
            "to_node": m.to_node, "status": m.status, "progress": round(m.progress, 4), "error": m.error,
            "started_at": m.started_at, "finished_at": m.finished_at}


def verify_json(v: VerifyReport) -> dict[str, Any]:
    return {"checked_blobs": v.checked_blobs, "checked_chunks": v.checked_chunks, "damaged": v.damaged,
            "repaired": v.repaired, "unrepaired": v.unrepaired, "blobs": list(v.details)}
