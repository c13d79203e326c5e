"""omx.mesh — cluster membership on a supervised HashiCorp Serf agent.

Pure parts: :mod:`~omx.mesh.view` (membership reducer), :mod:`~omx.mesh.tags`
(512-byte tag bound), :mod:`~omx.mesh.secret` / :mod:`~omx.mesh.token`
(cluster secret, derived keys, join tokens), :mod:`~omx.mesh.peer_auth`
(request signatures). I/O shells: :class:`SerfRPC` (msgpack RPC client),
:class:`SerfAgent` (process supervisor) and :class:`Membership` (both tied to
the view). The mesh knows nothing of models, HTTP handlers or the runtime.
"""

from __future__ import annotations

from omx.mesh.agent import SerfAgent
from omx.mesh.agent_config import DEFAULT_GOSSIP_PORT, AgentConfig, AgentState, serf_available
from omx.mesh.errors import (
    InvalidJoinToken,
    InvalidSecret,
    MeshError,
    SerfAgentError,
    SerfConnectionError,
    SerfRPCError,
    SerfTimeout,
    TagsTooLarge,
)
from omx.mesh.membership import Membership, MembershipEvent, Subscription
from omx.mesh.peer_auth import (
    HEADER_NODE,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Verifier,
    body_digest,
    sign,
)
from omx.mesh.records import Member, MemberEvent, QueryEvent, QueryResponse, SerfEvent, UserEvent
from omx.mesh.secret import ClusterSecret, hkdf_sha256, load_or_create_secret, read_secret, write_secret
from omx.mesh.serf_rpc import RpcStream, SerfRPC
from omx.mesh.tags import (
    NODE_TAGS_WORST_CASE,
    SERF_META_LIMIT,
    NodeTags,
    check_node_name,
    encode_tags,
    split_host_port,
)
from omx.mesh.token import JoinToken
from omx.mesh.view import MemberChanged, MembershipView, MemberState, MemberStatus, Snapshot, apply, diff

__all__ = [
    "DEFAULT_GOSSIP_PORT",
    "HEADER_NODE",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "NODE_TAGS_WORST_CASE",
    "SERF_META_LIMIT",
    "AgentConfig",
    "AgentState",
    "ClusterSecret",
    "InvalidJoinToken",
    "InvalidSecret",
    "JoinToken",
    "Member",
    "MemberChanged",
    "MemberEvent",
    "MemberState",
    "MemberStatus",
    "Membership",
    "MembershipEvent",
    "MembershipView",
    "MeshError",
    "NodeTags",
    "QueryEvent",
    "QueryResponse",
    "RpcStream",
    "SerfAgent",
    "SerfAgentError",
    "SerfConnectionError",
    "SerfEvent",
    "SerfRPC",
    "SerfRPCError",
    "SerfTimeout",
    "Snapshot",
    "Subscription",
    "TagsTooLarge",
    "UserEvent",
    "Verifier",
    "apply",
    "body_digest",
    "check_node_name",
    "diff",
    "encode_tags",
    "hkdf_sha256",
    "load_or_create_secret",
    "read_secret",
    "serf_available",
    "sign",
    "split_host_port",
    "write_secret",
]
