"""The membership view: a pure reducer over Serf member events.

``apply(view, event, now) -> view`` never does I/O and never reads a clock;
the caller passes ``now``. A :class:`Snapshot` (the full ``members`` list)
replaces the view, keeping ``changed_at`` for members whose state did not
change. :func:`diff` turns two views into the :class:`MemberChanged` events
that subscribers see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from omx.mesh.records import Member, MemberEvent

__all__ = [
    "MemberChanged",
    "MemberState",
    "MemberStatus",
    "MembershipView",
    "Snapshot",
    "apply",
    "diff",
    "mark_suspect",
]

MemberStatus = Literal["alive", "suspect", "leaving", "left", "failed", "none"]
_KNOWN_STATUS = frozenset({"alive", "suspect", "leaving", "left", "failed", "none"})

# Status a member has after each Serf event (member-update keeps the node alive).
_EVENT_STATUS: Mapping[str, MemberStatus] = {
    "member-join": "alive",
    "member-update": "alive",
    "member-leave": "left",
    "member-failed": "failed",
}


@dataclass(frozen=True)
class MemberState:
    """What the view knows of one node; ``changed_at`` is when status or tags last changed."""

    name: str
    addr: str
    port: int
    status: MemberStatus
    tags: Mapping[str, str]
    changed_at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))

    def __hash__(self) -> int:
        return hash((self.name, self.addr, self.port, self.status, tuple(sorted(self.tags.items()))))

    @property
    def alive(self) -> bool:
        return self.status == "alive"

    def same_state(self, other: MemberState) -> bool:
        """Equal apart from ``changed_at``."""
        return (self.addr, self.port, self.status, dict(self.tags)) == (
            other.addr, other.port, other.status, dict(other.tags))


@dataclass(frozen=True)
class Snapshot:
    """A full member list (from ``members``), replacing whatever the view held."""

    members: tuple[Member, ...]


@dataclass(frozen=True)
class MembershipView:
    """Node name -> :class:`MemberState`; immutable, replaced by :func:`apply`."""

    members: Mapping[str, MemberState] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.members.items())))

    def get(self, name: str) -> MemberState | None:
        return self.members.get(name)

    def alive(self) -> tuple[MemberState, ...]:
        """Alive members, sorted by name (a stable order every node agrees on)."""
        return tuple(m for _, m in sorted(self.members.items()) if m.status == "alive")

    def with_status(self, status: MemberStatus) -> tuple[MemberState, ...]:
        return tuple(m for _, m in sorted(self.members.items()) if m.status == status)

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, name: object) -> bool:
        return name in self.members


def _status(raw: str) -> MemberStatus:
    return raw if raw in _KNOWN_STATUS else "none"  # type: ignore[return-value]


def _state(member: Member, status: MemberStatus, now: float, previous: MemberState | None) -> MemberState:
    fresh = MemberState(member.name, member.addr, member.port, status, member.tags, now)
    if previous is not None and previous.same_state(fresh):
        return previous
    return fresh


def apply(view: MembershipView, event: MemberEvent | Snapshot, now: float) -> MembershipView:
    """Return the view after ``event``; ``view`` itself is never modified."""
    if isinstance(event, Snapshot):
        members = {m.name: _state(m, _status(m.status), now, view.members.get(m.name)) for m in event.members}
        return MembershipView(members)
    members = dict(view.members)
    for member in event.members:
        if event.kind == "member-reap":
            members.pop(member.name, None)
            continue
        status = _EVENT_STATUS.get(event.kind)
        if status is None:
            continue
        members[member.name] = _state(member, status, now, members.get(member.name))
    return MembershipView(members)


@dataclass(frozen=True)
class MemberChanged:
    """One node's state changed: ``before`` is ``None`` for a new node, ``after`` for a removed one."""

    name: str
    before: MemberState | None
    after: MemberState | None

    @property
    def kind(self) -> str:
        """``joined``, ``removed``, ``status`` (status changed) or ``updated`` (tags/address)."""
        if self.before is None:
            return "joined"
        if self.after is None:
            return "removed"
        return "status" if self.before.status != self.after.status else "updated"


def diff(old: MembershipView, new: MembershipView) -> tuple[MemberChanged, ...]:
    """The per-node changes from ``old`` to ``new``, sorted by node name."""
    names: Iterable[str] = sorted(set(old.members) | set(new.members))
    changes = []
    for name in names:
        before, after = old.members.get(name), new.members.get(name)
        if before is None or after is None or not before.same_state(after):
            if before is not after:
                changes.append(MemberChanged(name, before, after))
    return tuple(changes)


def mark_suspect(view: MembershipView, name: str, now: float) -> MembershipView:
    """Mark a node suspect (e.g. after a failed peer call) until Serf says otherwise."""
    state = view.members.get(name)
    if state is None or state.status != "alive":
        return view
    members = dict(view.members)
    members[name] = replace(state, status="suspect", changed_at=now)
    return MembershipView(members)
