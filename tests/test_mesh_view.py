"""The pure membership view and Serf record decoding."""

from __future__ import annotations

import pytest

from omx.mesh import Member, MemberEvent, MembershipView, Snapshot, apply, diff
from omx.mesh.errors import SerfRPCError
from omx.mesh.records import QueryEvent, UserEvent, decode_addr, decode_event, decode_member
from omx.mesh.view import mark_suspect


def m(name: str, status: str = "alive", **tags: str) -> Member:
    return Member(name=name, addr="10.0.0." + name[-1], port=4001, tags=tags, status=status)


def test_join_then_fail_then_leave_then_reap() -> None:
    view = apply(MembershipView(), MemberEvent("member-join", (m("n1"), m("n2"))), now=1.0)
    assert [s.name for s in view.alive()] == ["n1", "n2"]
    view2 = apply(view, MemberEvent("member-failed", (m("n2", "failed"),)), now=2.0)
    assert view2.get("n2").status == "failed" and view2.get("n2").changed_at == 2.0
    assert view.get("n2").status == "alive"  # the old view is untouched
    view3 = apply(view2, MemberEvent("member-leave", (m("n1", "left"),)), now=3.0)
    assert view3.get("n1").status == "left"
    view4 = apply(view3, MemberEvent("member-reap", (m("n2", "failed"),)), now=4.0)
    assert "n2" not in view4 and "n1" in view4 and len(view4) == 1


def test_update_changes_tags_and_keeps_changed_at_when_nothing_changed() -> None:
    view = apply(MembershipView(), MemberEvent("member-join", (m("n1", inv="1"),)), now=1.0)
    same = apply(view, MemberEvent("member-update", (m("n1", inv="1"),)), now=5.0)
    assert same.get("n1").changed_at == 1.0
    assert diff(view, same) == ()
    newer = apply(view, MemberEvent("member-update", (m("n1", inv="2"),)), now=6.0)
    assert newer.get("n1").tags["inv"] == "2" and newer.get("n1").changed_at == 6.0
    (change,) = diff(view, newer)
    assert change.kind == "updated" and change.before.tags["inv"] == "1"


def test_snapshot_replaces_and_diff_reports_every_kind() -> None:
    view = apply(MembershipView(), Snapshot((m("n1"), m("n2"), m("n3"))), now=1.0)
    snap = Snapshot((m("n1"), m("n2", "failed"), m("n4")))
    new = apply(view, snap, now=2.0)
    assert set(new.members) == {"n1", "n2", "n4"}
    assert new.get("n1").changed_at == 1.0
    kinds = {c.name: c.kind for c in diff(view, new)}
    assert kinds == {"n2": "status", "n3": "removed", "n4": "joined"}


def test_unknown_status_and_suspect() -> None:
    view = apply(MembershipView(), Snapshot((m("n1", "weird"), m("n2"))), now=1.0)
    assert view.get("n1").status == "none"
    sus = mark_suspect(view, "n2", now=2.0)
    assert sus.get("n2").status == "suspect"
    assert mark_suspect(view, "n1", now=2.0) is view
    back = apply(sus, MemberEvent("member-update", (m("n2"),)), now=3.0)
    assert back.get("n2").alive


def test_view_is_immutable() -> None:
    view = apply(MembershipView(), Snapshot((m("n1"),)), now=1.0)
    with pytest.raises(TypeError):
        view.members["x"] = view.get("n1")  # type: ignore[index]
    with pytest.raises(TypeError):
        view.get("n1").tags["a"] = "b"  # type: ignore[index]


def test_decode_addresses() -> None:
    assert decode_addr(bytes([127, 0, 0, 2])) == "127.0.0.2"
    assert decode_addr(bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])) == "10.1.2.3"
    assert decode_addr(bytes(15) + b"\x01") == "::1"
    assert decode_addr([192, 168, 0, 1]) == "192.168.0.1"
    with pytest.raises(SerfRPCError):
        decode_addr(b"\x01\x02\x03")


def test_decode_member_and_events() -> None:
    raw = {"Name": "n1", "Addr": b"\x7f\x00\x00\x01", "Port": 4001, "Tags": {"api": "127.0.0.1:8080"},
           "Status": "alive", "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
           "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4}
    member = decode_member(raw)
    assert (member.name, member.addr, member.port, member.protocol_cur, member.delegate_cur) == (
        "n1", "127.0.0.1", 4001, 2, 4)
    event = decode_event({"Event": "member-failed", "Members": [raw]})
    assert isinstance(event, MemberEvent) and event.kind == "member-failed" and event.members == (member,)
    user = decode_event({"Event": "user", "Name": "inv", "Payload": b"\x00\x01", "LTime": 7,
                         "Coalesce": True})
    assert user == UserEvent("inv", b"\x00\x01", 7, True)
    query = decode_event({"Event": "query", "ID": 3, "Name": "q", "Payload": b"p", "LTime": 2})
    assert query == QueryEvent(3, "q", b"p", 2)
    with pytest.raises(SerfRPCError):
        decode_event({"Event": "bogus"})
    with pytest.raises(SerfRPCError):
        decode_member({"Name": "n1"})



def test_public_exports_are_what_they_claim() -> None:
    import omx.mesh

    assert len(omx.mesh.__all__) == len(set(omx.mesh.__all__))
    missing = [name for name in omx.mesh.__all__ if not hasattr(omx.mesh, name)]
    assert missing == []
