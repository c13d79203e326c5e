"""Replication status of each model and of the cluster, from placement's view. Pure.

A model's ``status`` (``/api/distributed/models``):

* ``unavailable``: no alive node holds its current version complete;
* ``ready``: holders >= factor, or every alive member holds it (factor > alive nodes);
* ``replicating``: not ready, and some alive node is fetching it (a partial blob
  of the model, or a transfer that made progress within the stall window);
* ``under_replicated``: not ready and nothing is being fetched (no room anywhere,
  or the plan has not run yet).

The cluster's ``replication_health`` (``/api/distributed/replication/status``):
``healthy`` when every model is ready (or there is none), ``critical`` when any
model is unavailable (its data cannot be reached at all), else ``degraded``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from omx.types import BlobDigest, NodeId

from .placement import DEFAULT_STALL_S, NO_CONSTRAINTS, ClusterSnapshot, Constraints, ModelView, model_views

__all__ = [
    "Health", "ModelState", "ModelStatus", "model_state", "model_statuses", "replication_health", "status_of",
]

ModelState = Literal["ready", "replicating", "under_replicated", "unavailable"]
Health = Literal["healthy", "degraded", "critical"]


def model_state(view: ModelView) -> ModelState:
    """The status of one model (rules in the module docstring)."""
    if not view.holders:
        return "unavailable"
    if len(view.holders) >= view.target:
        return "ready"
    return "replicating" if view.in_progress else "under_replicated"


@dataclass(frozen=True)
class ModelStatus:
    """One row of ``/api/distributed/models``; ``nodes`` are the alive holders, best ranked first."""

    name: str
    key: str
    digest: BlobDigest
    factor: int
    nodes: tuple[NodeId, ...]
    total_size: int
    status: ModelState
    in_progress: tuple[NodeId, ...]
    offline_holders: tuple[NodeId, ...]

    @property
    def replicas(self) -> int:
        return len(self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "replicas": self.replicas, "factor": self.factor, "nodes": list(self.nodes),
                "total_size": self.total_size, "status": self.status, "digest": self.digest,
                "in_progress": list(self.in_progress), "offline_holders": list(self.offline_holders)}


def status_of(view: ModelView) -> ModelStatus:
    return ModelStatus(view.name, view.key, view.digest, view.factor, view.holders, view.size, model_state(view),
                       view.in_progress, view.offline_holders)


def model_statuses(
    snapshot: ClusterSnapshot, default_factor: int, now: float, *,
    constraints: Constraints = NO_CONSTRAINTS, stall_s: float = DEFAULT_STALL_S,
) -> tuple[ModelStatus, ...]:
    """The status of every model known to any member, in model key order."""
    return tuple(status_of(v) for v in model_views(snapshot, default_factor, now, constraints=constraints,
                                                    stall_s=stall_s))


def replication_health(statuses: Iterable[ModelStatus]) -> Health:
    """``healthy``/``degraded``/``critical`` (rules in the module docstring)."""
    states = {s.status for s in statuses}
    if "unavailable" in states:
        return "critical"
    return "healthy" if states <= {"ready"} else "degraded"
