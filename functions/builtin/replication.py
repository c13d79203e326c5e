"""Replication endpoints: ``/api/distributed/{models,replicate,replication/status,rebalance,migrate,verify}``.

Shapes follow the original model-management docs, with real values from the
node's :class:`~omx.functions.replication_view.ReplicationView`. Changing
placement (replicate, rebalance, migrate, verify) is cluster administration:
it needs an admin key when API keys are configured, a loopback client
otherwise; reading the state needs an API key like any client endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, StrictInt, StrictStr

from omx.errors import NotFound, OmxError
from omx.functions.call import Call
from omx.functions.registry import FunctionRegistry
from omx.functions.replication_view import (
    ReplicationView,
    migration_json,
    placement_json,
    rebalance_json,
    summary_json,
    verify_json,
)
from omx.functions.schemas import _Body
from omx.storage.holdings import MAX_FACTOR
from omx.storage.names import ModelName

__all__ = ["MAX_FACTOR", "MigrateRequest", "ReplicateRequest", "VerifyRequest", "register"]



class ReplicateRequest(_Body):
    model: StrictStr = Field(min_length=1, max_length=500)
    factor: StrictInt = Field(ge=1, le=MAX_FACTOR)


class MigrateRequest(_Body):
    model_name: StrictStr = Field(min_length=1, max_length=500)
    from_node: StrictStr = Field(min_length=1, max_length=128)
    to_node: StrictStr = Field(min_length=1, max_length=128)


class PeerFetchRequest(_Body):
    model: StrictStr = Field(min_length=1, max_length=500)
    digest: StrictStr | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    origin: Literal["user", "replica", "demand"] = "replica"


class PeerDropRequest(_Body):
    model: StrictStr = Field(min_length=1, max_length=500)
    digest: StrictStr = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    keeper: StrictStr = Field(min_length=1, max_length=128)


class VerifyRequest(_Body):
    model: StrictStr | None = Field(default=None, min_length=1, max_length=500)


def _view(call: Call) -> ReplicationView:
    view = call.services.replication
    if view is None:
        raise OmxError("this node has no replicator", status=503)
    return view


def _model_name(text: str) -> str:
    """The canonical display name of a model reference (400 on a malformed one)."""
    return ModelName.parse(text).display


async def models(_body: None, call: Call) -> dict[str, Any]:
    """Every model in the cluster: where it is held, its factor and status."""
    return {"models": [placement_json(p) for p in _view(call).placements()]}


async def replicate(body: ReplicateRequest, call: Call) -> dict[str, Any]:
    """Set a model's replication factor (cluster-wide) and start reconciling."""
    placement = await _view(call).set_factor(_model_name(body.model), body.factor)
    return {"message": "Replication factor set", "status": "started", **placement_json(placement)}


async def replication_status(_body: None, call: Call) -> dict[str, Any]:
    """Replication health and the transfers in progress."""
    return summary_json(_view(call).summary())


async def rebalance(_body: None, call: Call) -> dict[str, Any]:
    """Compute the placement plan now and start carrying it out."""
    return rebalance_json(await _view(call).rebalance())


async def migrate(body: MigrateRequest, call: Call) -> dict[str, Any]:
    """Move a model's copy from one node to another (the source goes once the target verified it)."""
    state = await _view(call).migrate(_model_name(body.model_name), body.from_node, body.to_node)
    return {"message": "Migration initiated", **migration_json(state)}


async def migration(_body: None, call: Call) -> dict[str, Any]:
    """The state of one migration started on this node."""
    migration_id = call.path_params.get("migration_id", "")
    state = _view(call).migration(migration_id)
    if state is None:
        raise NotFound(f"migration {migration_id!r} not found on this node")
    return migration_json(state)


async def verify(body: VerifyRequest, call: Call) -> dict[str, Any]:
    """Re-hash every chunk of this node's blobs (or one model's) and repair damage from peers."""
    model = _model_name(body.model) if body.model else None
    report = await _view(call).verify(model)
    return verify_json(report)


async def peer_fetch(body: PeerFetchRequest, call: Call) -> AsyncIterator[dict[str, object]]:
    """(peer) Fetch a model from its holders here, streaming progress (a migration's target)."""
    return await _view(call).fetch_command(_model_name(body.model), body.digest, body.origin)


async def peer_drop(body: PeerDropRequest, call: Call) -> dict[str, object]:
    """(peer) Drop this node's copy of a model once the keeper holds it (a migration's source)."""
    return await _view(call).drop_command(_model_name(body.model), body.digest, body.keeper)


async def peer_kick(_body: None, call: Call) -> dict[str, object]:
    """(peer) Reconcile placement now (a rebalance or factor change elsewhere)."""
    _view(call).kick()
    return {"status": "ok"}


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    tags = ("cluster",)
    h("/api/distributed/models", methods=("GET",), name="distributed_models", tags=tags)(models)
    h("/api/distributed/replication/status", methods=("GET",), name="replication_status", tags=tags)(
        replication_status)
    h("/api/distributed/replicate", request=ReplicateRequest, auth="admin", name="replicate", tags=tags)(replicate)
    h("/api/distributed/rebalance", methods=("POST",), auth="admin", name="rebalance", tags=tags)(rebalance)
    h("/api/distributed/migrate", request=MigrateRequest, auth="admin", name="migrate", tags=tags)(migrate)
    h("/api/distributed/migrate/{migration_id}", methods=("GET",), name="migration", tags=tags)(migration)
    h("/api/distributed/verify", request=VerifyRequest, auth="admin", name="verify", tags=tags)(verify)
    peer = ("peer",)
    h("/api/peer/replication/fetch", request=PeerFetchRequest, response="ndjson", auth="peer", name="peer_fetch",
      tags=peer)(peer_fetch)
    h("/api/peer/replication/drop", request=PeerDropRequest, auth="peer", name="peer_drop", tags=peer)(peer_drop)
    h("/api/peer/replication/kick", methods=("POST",), auth="peer", name="peer_kick", tags=peer)(peer_kick)
