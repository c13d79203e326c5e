"""Pure conversions: membership view + inventories -> node records and stream messages."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from omx.functions.cluster_view import NodeRecord, Resources, node_json
from omx.mesh import MemberState, NodeTags
from omx.runtime.cluster.inventory import PeerInventory
from omx.runtime.events import Event, MemberUpdate, NodeStateChanged
from omx.timefmt import iso_time

__all__ = ["member_record", "message", "node_label", "public_status", "snapshot_message"]

_STATUS = {"alive": "alive", "suspect": "suspect", "failed": "failed", "left": "left", "leaving": "left",
           "none": "failed"}
_LABEL_DROP = re.compile(r"[^A-Za-z0-9 _.-]")


def public_status(status: str) -> str:
    """Serf's member status as the API reports it: alive, suspect, failed or left."""
    return _STATUS.get(status, "failed")


def node_label(name: str | None) -> str:
    """A node's human name made fit for the ``label`` tag (63 safe characters)."""
    return _LABEL_DROP.sub("", name or "")[:63]


def member_record(state: MemberState, *, self_id: str, self_models: tuple[str, ...], self_version: str,
                  self_resources: Resources, peers: Mapping[str, PeerInventory],
                  self_sizes: Mapping[str, int] | None = None) -> NodeRecord:
    """The :class:`NodeRecord` of one member of the view."""
    tags = NodeTags.from_tags(state.tags)
    addr = f"[{state.addr}]:{state.port}" if ":" in state.addr else f"{state.addr}:{state.port}"
    status = public_status(state.status)
    is_self = state.name == self_id
    resources: Resources | None
    if is_self:
        models, resources, version = self_models, self_resources, self_version
        sizes = dict(self_sizes or {})
    else:
        inv = peers.get(state.name)
        models = inv.models if inv is not None else ()
        sizes = dict(inv.sizes) if inv is not None else {}
        resources = inv.resources if inv is not None and inv.error is None and status == "alive" else None
        version = tags.inventory if tags is not None else (inv.version if inv else "")
    return NodeRecord(
        id=state.name, name=(tags.label or None) if tags else None, status=status,
        address=tags.api if tags else None, p2p_address=addr, models=tuple(models), inventory_version=version,
        resources=resources, is_self=is_self, last_change=state.changed_at, model_sizes=sizes,
    )


def snapshot_message(records: list[NodeRecord]) -> dict[str, Any]:
    return {"type": "snapshot", "nodes": [node_json(r) for r in records], "timestamp": iso_time(time.time())}


def message(event: Event) -> dict[str, Any] | None:
    """The event stream's message for ``event`` (``None`` for internal events)."""
    if isinstance(event, MemberUpdate):
        return {"type": "member", "change": event.change, "node": node_json(event.node),
                "timestamp": iso_time(event.at)}
    if isinstance(event, NodeStateChanged):
        return {"type": "node_state", "node_id": event.node_id, "state": dict(event.state),
                "timestamp": iso_time(event.at)}
    return None
