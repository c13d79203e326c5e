"""Frozen values decoded from Serf RPC bodies (pure, no I/O).

Serf's wire shapes use Go field names (``Name``, ``Addr``…); everything the
rest of omx sees is one of the dataclasses below.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from omx.mesh.errors import SerfRPCError

__all__ = [
    "MEMBER_EVENT_KINDS",
    "Member",
    "MemberEvent",
    "MemberEventKind",
    "QueryEvent",
    "QueryResponse",
    "SerfEvent",
    "UserEvent",
    "decode_addr",
    "decode_event",
    "decode_member",
]

MemberEventKind = Literal["member-join", "member-leave", "member-failed", "member-update", "member-reap"]
MEMBER_EVENT_KINDS: frozenset[str] = frozenset(
    {"member-join", "member-leave", "member-failed", "member-update", "member-reap"}
)


def _frozen_tags(tags: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(tags or {}))


@dataclass(frozen=True)
class Member:
    """One cluster member as Serf reports it.

    ``status`` is Serf's string: ``alive``, ``leaving``, ``left``, ``failed``
    (or ``none``). ``addr`` is the textual IP address of the gossip endpoint.
    """

    name: str
    addr: str
    port: int
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    status: str = "alive"
    protocol_min: int = 0
    protocol_max: int = 0
    protocol_cur: int = 0
    delegate_min: int = 0
    delegate_max: int = 0
    delegate_cur: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _frozen_tags(self.tags))

    def __hash__(self) -> int:
        return hash((self.name, self.addr, self.port, tuple(sorted(self.tags.items())), self.status))


@dataclass(frozen=True)
class MemberEvent:
    """A membership change Serf announced for one or more members."""

    kind: MemberEventKind
    members: tuple[Member, ...]


@dataclass(frozen=True)
class UserEvent:
    """A user event broadcast with ``serf event`` / :meth:`SerfRPC.user_event`."""

    name: str
    payload: bytes
    ltime: int
    coalesce: bool


@dataclass(frozen=True)
class QueryEvent:
    """A query addressed to this node; answer it with :meth:`SerfRPC.respond` and ``id``."""

    id: int
    name: str
    payload: bytes
    ltime: int


@dataclass(frozen=True)
class QueryResponse:
    """One answer to a query this node issued."""

    node: str
    payload: bytes


SerfEvent: TypeAlias = MemberEvent | UserEvent | QueryEvent


def decode_addr(raw: Any) -> str:
    """Turn Serf's ``Addr`` (4 or 16 raw bytes, IPv4-mapped allowed) into an IP string."""
    if isinstance(raw, list | tuple):
        raw = bytes(raw)
    if not isinstance(raw, bytes | bytearray) or len(raw) not in (4, 16):
        raise SerfRPCError(f"malformed member address from serf: {raw!r}")
    ip = ipaddress.ip_address(bytes(raw))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value) if value is not None else ""


def _bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        # Old-style msgpack raw strings arrive as str; undo the lossless decoding.
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def decode_member(body: Mapping[str, Any]) -> Member:
    """Decode one member record of a ``members`` or stream body."""
    try:
        tags = {_text(k): _text(v) for k, v in (body.get("Tags") or {}).items()}
        return Member(
            name=_text(body["Name"]),
            addr=decode_addr(body["Addr"]),
            port=int(body["Port"]),
            tags=tags,
            status=_text(body.get("Status", "none")),
            protocol_min=int(body.get("ProtocolMin", 0)),
            protocol_max=int(body.get("ProtocolMax", 0)),
            protocol_cur=int(body.get("ProtocolCur", 0)),
            delegate_min=int(body.get("DelegateMin", 0)),
            delegate_max=int(body.get("DelegateMax", 0)),
            delegate_cur=int(body.get("DelegateCur", 0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SerfRPCError(f"malformed member record from serf: {exc}") from exc


def decode_event(body: Mapping[str, Any]) -> SerfEvent:
    """Decode one record of an event stream into a frozen event."""
    kind = _text(body.get("Event"))
    if kind in MEMBER_EVENT_KINDS:
        members = tuple(decode_member(m) for m in body.get("Members") or ())
        return MemberEvent(kind=kind, members=members)  # type: ignore[arg-type]
    if kind == "user":
        return UserEvent(
            name=_text(body.get("Name")),
            payload=_bytes(body.get("Payload")),
            ltime=int(body.get("LTime", 0)),
            coalesce=bool(body.get("Coalesce", False)),
        )
    if kind == "query":
        return QueryEvent(
            id=int(body["ID"]),
            name=_text(body.get("Name")),
            payload=_bytes(body.get("Payload")),
            ltime=int(body.get("LTime", 0)),
        )
    raise SerfRPCError(f"unknown serf stream record: {kind!r}")
