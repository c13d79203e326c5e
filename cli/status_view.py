"""What ``omx status`` and ``omx nodes`` print, as pure functions of the node's JSON.

The layout is the original docs' (``• OllamaMax Cluster Status``, a rule, the
overall line, node information, a quick summary); omx adds the cluster size and
peers, and says plainly what differs (no leader: every node is a ``peer``; the
web line says when the dashboard is turned off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from omx.cli.format import human_bytes, parse_timestamp

__all__ = [
    "RULE",
    "ClusterSnapshot",
    "compact_bytes",
    "nodes_table",
    "problems",
    "status_lines",
    "uptime_text",
]

RULE = "━"
_STATUS_STYLE = {"alive": "green", "suspect": "yellow", "failed": "red", "left": "dim"}


@dataclass(frozen=True)
class ClusterSnapshot:
    """The four documents a status view is drawn from (as the node returned them)."""

    health: dict[str, Any]
    status: dict[str, Any]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"health": self.health, "status": self.status, "nodes": {"nodes": self.nodes},
                "metrics": self.metrics}


def uptime_text(seconds: float | int | None) -> str:
    """``0h 2m`` as in the docs (hours keep growing past a day)."""
    total = int(seconds or 0)
    return f"{total // 3600}h {total % 3600 // 60}m"


def compact_bytes(size: int | None) -> str:
    """``2GB`` / ``512MB``: the docs' resource style (no space)."""
    return "?" if size is None else human_bytes(int(size)).replace(" ", "")


def _percent(fraction: Any) -> str:
    return f"{float(fraction) * 100:.1f}%" if isinstance(fraction, int | float) else "?"


def _local_time(value: Any) -> str:
    parsed = parse_timestamp(value) if isinstance(value, str) else None
    when = parsed.astimezone() if parsed else datetime.now().astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S")


def _hostport(url: Any) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    return url.split("://", 1)[-1].rstrip("/")


def problems(snap: ClusterSnapshot) -> list[str]:
    """What is wrong, one short sentence each (empty when all is well)."""
    health, found = snap.health, []
    services = health.get("services") or {}
    if health.get("membership") == "serf" and not services.get("p2p"):
        found.append("❌ Serf agent is down: peers cannot see this node (see 'omx troubleshoot')")
    for node in snap.nodes:
        if node.get("self"):
            continue
        state = node.get("status")
        if state in ("failed", "suspect"):
            found.append(f"⚠️  Peer {node.get('id')} is {state}")
    if health.get("status") not in (None, "healthy") and not found:
        found.append(f"⚠️  Node reports {health.get('status')} (see 'omx troubleshoot')")
    return found


def _overall(health: dict[str, Any]) -> str:
    value = str(health.get("status") or "unknown")
    icon = "✅" if value == "healthy" else "⚠️ " if value == "degraded" else "❌"
    return f"{icon} Overall Status: {value}"


def _cluster_lines(snap: ClusterSnapshot) -> list[str]:
    health, status = snap.health, snap.status
    integration = status.get("integration_stats") or {}
    if health.get("membership") == "standalone":
        membership = "standalone (serf is not installed: this node runs alone)"
    elif (health.get("services") or {}).get("p2p"):
        membership = f"serf gossip on {integration.get('gossip_address') or '?'}"
    else:
        membership = "serf agent down"
    alive = status.get("active_nodes") or []
    size = status.get("cluster_size", len(snap.nodes) or 1)
    lines = ["🌐 Cluster", f"   Membership: {membership}",
             f"   Size: {size} node{'s' if size != 1 else ''} ({len(alive)} alive)"]
    peers = [n for n in snap.nodes if not n.get("self")]
    if not peers:
        lines.append("   Peers: none")
    else:
        lines.append("   Peers:")
        for peer in peers:
            name = f" ({peer['name']})" if peer.get("name") else ""
            lines.append(f"     {peer.get('id')}{name} {peer.get('status')} at {peer.get('address')}")
    return lines


def _verbose_lines(status: dict[str, Any]) -> list[str]:
    node = status.get("node") or {}
    res = node.get("resources") or {}
    models = node.get("models") or []
    services = node.get("services") or {}
    lines = ["", "💾 Resource Usage",
             f"   CPU: {_percent(res.get('cpu'))} ({res.get('cpu_count', '?')} cores)",
             f"   Memory: {_percent(res.get('memory'))} "
             f"({compact_bytes(res.get('memory_used'))} / {compact_bytes(res.get('memory_total'))})",
             f"   Disk: {_percent(res.get('disk'))} "
             f"({compact_bytes(res.get('disk_used'))} / {compact_bytes(res.get('disk_total'))})",
             "", "🤖 Model Information",
             f"   Total Models: {len(models)}",
             f"   Active Models: {sum(1 for m in models if m.get('loaded'))}"]
    if models:
        lines.append("   Models:")
        for model in models:
            icon = "🟢" if model.get("loaded") else "📦"
            count = int(model.get("requests") or 0)
            lines.append(f"     {icon} {model.get('name')} ({compact_bytes(model.get('size'))}) - "
                         f"{count} request{'s' if count != 1 else ''}")
    lines += _routing_lines(status.get("routing") or {})
    api = _hostport(services.get("api"))
    web = services.get("web") if isinstance(services.get("web"), str) else None
    p2p = services.get("p2p")
    lines += ["", "• Network Services",
              f"   API: listening on {api}" if api else "   API: unknown",
              f"   Web: dashboard at {web}" if web else "   Web: off (web.enabled: false)",
              f"   P2P: gossip on {p2p}" if p2p else "   P2P: not running",
              f"   Connections: {node.get('connections', 0)}"]
    return lines


def _routing_lines(routing: dict[str, Any]) -> list[str]:
    """Where the requests this node took in ran, per model and node (``omx_routed_requests_total``)."""
    rows = [r for r in routing.get("requests") or [] if isinstance(r, dict)]
    held = int(routing.get("held") or 0)
    lines = ["", "🔀 Routing (requests taken in here, by the node that served them)"]
    if held:
        lines.append(f"   Waiting for a free slot: {held}")
    if not rows:
        return [*lines, "   Routed requests: none yet"]
    for model in dict.fromkeys(str(r.get("model")) for r in rows):
        per_node = ", ".join(f"{r.get('node')} {int(r.get('requests') or 0)}" for r in rows
                             if str(r.get("model")) == model)
        lines.append(f"   {model}: {per_node}")
    return lines


def status_lines(snap: ClusterSnapshot, *, verbose: bool = False) -> list[str]:
    """Every line of ``omx status`` (``--verbose`` adds resources, models and services)."""
    health, status = snap.health, snap.status
    node = status.get("node") or {}
    lines = ["• OllamaMax Cluster Status", RULE * 25, _overall(health),
             f"• Timestamp: {_local_time(health.get('timestamp'))}", "",
             "📦 Node Information", f"   ID: {health.get('node_id') or node.get('id')}"]
    name = health.get("node_name") or node.get("name")
    if name:
        lines.append(f"   Name: {name}")
    lines += [f"   Status: {health.get('status', 'unknown')}",
              f"   Role: {node.get('role') or 'peer'}",
              f"   Uptime: {uptime_text(health.get('uptime', node.get('uptime')))}", ""]
    lines += _cluster_lines(snap)
    if verbose:
        lines += _verbose_lines(status)
    lines += ["", "📊 Quick Summary", RULE * 15]
    found = problems(snap)
    if found:
        lines += found
    else:
        lines += ["✅ All systems operational", "🚀 Ready to serve AI models"]
    return lines


def _fraction_cell(resources: dict[str, Any] | None, key: str) -> str:
    value = (resources or {}).get(key)
    return f"{float(value) * 100:.0f}%" if isinstance(value, int | float) else "-"


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    """``omx nodes``: one row per member, the status coloured as Serf names it."""
    table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 3, 0, 0), header_style="bold")
    for column in ("ID", "NAME", "STATUS", "ADDRESS", "MODELS", "CPU", "MEM", "DISK"):
        table.add_column(column, no_wrap=True)
    for node in nodes:
        state = str(node.get("status") or "?")
        models = node.get("models") or []
        ident = str(node.get("id") or "?") + (" *" if node.get("self") else "")
        table.add_row(ident, node.get("name") or "-", Text(state, style=_STATUS_STYLE.get(state, "")),
                      str(node.get("address") or "-"), ", ".join(models) if models else "-",
                      _fraction_cell(node.get("resources"), "cpu"),
                      _fraction_cell(node.get("resources"), "memory"),
                      _fraction_cell(node.get("resources"), "disk"))
    return table
