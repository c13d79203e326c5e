"""``omx status`` (with ``--verbose``, ``--json`` and ``--watch``) and ``omx nodes``."""

from __future__ import annotations

from typing import Any

import click

from omx.cli.client import CliFailure, NodeClient, client_for
from omx.cli.output import console, echo_json
from omx.cli.status_view import ClusterSnapshot, nodes_table, status_lines

__all__ = ["fetch_snapshot", "nodes_cmd", "status_cmd"]

DEFAULT_INTERVAL_S = 5.0


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CliFailure(f"Error: unexpected answer from {path} (not a JSON object)")
    return value


def fetch_snapshot(client: NodeClient) -> ClusterSnapshot:
    """The node's health, distributed status, member list and metrics."""
    health = _object(client.get("/health"), "/health")
    status = _object(client.get("/api/distributed/status"), "/api/distributed/status")
    nodes = _object(client.get("/api/distributed/nodes"), "/api/distributed/nodes").get("nodes") or []
    metrics = _object(client.get("/api/distributed/metrics"), "/api/distributed/metrics")
    return ClusterSnapshot(health=health, status=status, nodes=[n for n in nodes if isinstance(n, dict)],
                           metrics=metrics)


@click.command("status")
@click.option("--verbose", is_flag=True, help="Add resources, models and network services.")
@click.option("--watch", is_flag=True, help="Refresh live (on cluster events and every --interval seconds).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=DEFAULT_INTERVAL_S, show_default=True,
              help="Seconds between refreshes in --watch mode.")
@click.option("--json", "as_json", is_flag=True, help="Print the node's health, status, nodes and metrics as JSON.")
@click.pass_context
def status_cmd(ctx: click.Context, verbose: bool, watch: bool, interval: float, as_json: bool) -> None:
    """Show the health of this node and its cluster."""
    if watch and as_json:
        raise CliFailure("Error: --watch and --json cannot be combined", exit_code=2)
    client = client_for(ctx)
    if watch:
        from omx.cli.watch import watch_status

        watch_status(client, fetch_snapshot, interval=interval, verbose=verbose)
        return
    with client:
        snap = fetch_snapshot(client)
    if as_json:
        echo_json(snap.as_json())
        return
    out = console()
    for line in status_lines(snap, verbose=verbose):
        out.print(line)


@click.command("nodes")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def nodes_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the cluster's members (alive, suspect, failed or left)."""
    with client_for(ctx) as client:
        data = _object(client.get("/api/distributed/nodes"), "/api/distributed/nodes")
    if as_json:
        echo_json(data)
        return
    nodes = [n for n in data.get("nodes") or [] if isinstance(n, dict)]
    console().print(nodes_table(nodes))
