"""The replicator: placement carried out on this node, migrations, verify and repair, pulls from peers."""

from omx.runtime.replication.link import ClusterLink, PeerCommands
from omx.runtime.replication.operations import ReplicationService
from omx.runtime.replication.replicator import ReplicationSettings, Replicator

__all__ = ["ClusterLink", "PeerCommands", "ReplicationService", "ReplicationSettings", "Replicator"]
