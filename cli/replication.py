"""``omx replication status``, ``replicate``, ``rebalance``, ``migrate`` and ``verify``.

Each asks the node (``/api/distributed/...``); every command takes ``--json``.
``migrate`` follows the migration with a progress bar until it completes or
fails (``--no-wait`` returns at once); ``verify`` exits 1 when a damaged chunk
could not be repaired.
"""

from __future__ import annotations

import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn

from omx.cli.client import CliFailure, NodeClient, client_for
from omx.cli.format import human_bytes as human_size
from omx.cli.output import console, echo_json, plain_table
from omx.storage.holdings import MAX_FACTOR

__all__ = ["register"]

_POLL_S = 0.5


def _client(ctx: click.Context, timeout: float = 30.0) -> NodeClient:
    client = client_for(ctx)
    client.timeout = timeout
    return client


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    filled = int(round(frac * width))
    return "█" * filled + "░" * (width - filled) + f" {frac * 100:5.1f}%"


@click.group("replication", invoke_without_command=False)
def replication_group() -> None:
    """Replication state of the cluster."""


@replication_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def replication_status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Models, their holders and factor, and the transfers in progress."""
    with _client(ctx) as client:
        status = client.get("/api/distributed/replication/status")
        models = client.get("/api/distributed/models").get("models", [])
    if as_json:
        echo_json({**status, "models": models})
        return
    out = console()
    out.print(f"Replication health: {status.get('replication_health')}  "
              f"(models {status.get('replicated_models')}/{status.get('total_models')} at their factor, "
              f"{status.get('pending_replications')} pending, {status.get('failed_replications')} failed)")
    table = plain_table("MODEL", "STATUS", "REPLICAS", "FACTOR", "SIZE", "NODES")
    for m in models:
        table.add_row(str(m["name"]), str(m["status"]), str(m["replicas"]), str(m["factor"]),
                      human_size(int(m.get("total_size") or 0)), ", ".join(m.get("nodes", [])))
    out.print(table)
    transfers = status.get("transfers", [])
    if transfers:
        out.print("")
        ttable = plain_table("MODEL", "TO", "FROM", "STATE", "PROGRESS")
        for t in transfers:
            done, total = int(t.get("bytes_done") or 0), int(t.get("bytes_total") or 0)
            ttable.add_row(str(t["model"]), str(t["to"]), ", ".join(t.get("sources", [])) or "-",
                           str(t["state"]),
                           f"{_bar(done, total)} {human_size(done)}/{human_size(total)}")
        out.print(ttable)


@click.command("replicate")
@click.argument("model")
@click.option("--factor", type=click.IntRange(1, MAX_FACTOR), required=True, help="Copies of the model to keep.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def replicate_cmd(ctx: click.Context, model: str, factor: int, as_json: bool) -> None:
    """Set a model's replication factor (cluster-wide) and start reconciling."""
    with _client(ctx) as client:
        result = client.post("/api/distributed/replicate", {"model": model, "factor": factor})
    if as_json:
        echo_json(result)
        return
    click.echo(f"{result['name']}: factor {result['factor']}, {result['replicas']} replica(s) now "
               f"({', '.join(result.get('nodes', [])) or 'none'}), {result['status']}")


@click.command("rebalance")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def rebalance_cmd(ctx: click.Context, as_json: bool) -> None:
    """Compute the placement plan and start carrying it out."""
    with _client(ctx) as client:
        result = client.post("/api/distributed/rebalance", {})
    if as_json:
        echo_json(result)
        return
    plan = result.get("plan", [])
    click.echo(f"{result['message']} ({result['rebalance_id']}): {len(plan)} change(s), "
               f"estimated {result.get('estimated_time')}")
    for step in plan:
        click.echo(f"  {step['action']:4} {step['model']} on {step['node']} ({human_size(int(step.get('size', 0)))})")


def _follow_migration(client: NodeClient, state: dict[str, Any]) -> dict[str, Any]:
    migration_id = state["migration_id"]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  console=console(err=True), transient=False) as progress:
        task = progress.add_task(f"{state['model_name']} {state['from_node']} → {state['to_node']}", total=1.0)
        while state["status"] not in ("completed", "failed"):
            time.sleep(_POLL_S)
            state = client.get(f"/api/distributed/migrate/{migration_id}")
            progress.update(task, completed=float(state.get("progress") or 0.0))
        progress.update(task, completed=1.0 if state["status"] == "completed" else state.get("progress", 0.0))
    return state


@click.command("migrate")
@click.argument("model")
@click.option("--from", "from_node", required=True, metavar="NODE", help="Node id, name or unique prefix.")
@click.option("--to", "to_node", required=True, metavar="NODE", help="Node id, name or unique prefix.")
@click.option("--no-wait", is_flag=True, help="Return once the migration has started.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (the final state unless --no-wait).")
@click.pass_context
def migrate_cmd(ctx: click.Context, model: str, from_node: str, to_node: str, no_wait: bool, as_json: bool) -> None:
    """Move MODEL's copy from one node to another; the source copy goes once the target verified it."""
    with _client(ctx) as client:
        state = client.post("/api/distributed/migrate",
                            {"model_name": model, "from_node": from_node, "to_node": to_node})
        if not no_wait:
            if as_json:
                while state["status"] not in ("completed", "failed"):
                    time.sleep(_POLL_S)
                    state = client.get(f"/api/distributed/migrate/{state['migration_id']}")
            else:
                state = _follow_migration(client, state)
    if as_json:
        echo_json(state)
    elif no_wait:
        click.echo(f"Migration initiated: {state['migration_id']}")
    elif state["status"] == "completed":
        click.echo(f"{state['model_name']} moved from {state['from_node']} to {state['to_node']}")
    if state["status"] == "failed":
        raise CliFailure(f"Error: migration {state['migration_id']} failed: {state.get('error')}")


@click.command("verify")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, model: str | None, as_json: bool) -> None:
    """Re-hash every chunk of the node's blobs (or MODEL's) and repair damage from peers; exit 1 if any stays."""
    with _client(ctx, timeout=3600.0) as client:
        report = client.post("/api/distributed/verify", {"model": model} if model else {})
    if as_json:
        echo_json(report)
    else:
        click.echo(f"checked {report['checked_chunks']} chunks in {report['checked_blobs']} blobs: "
                   f"{report['damaged']} damaged, {report['repaired']} repaired, {report['unrepaired']} unrepaired")
        for blob in report.get("blobs", []):
            if blob.get("damaged"):
                click.echo(f"  {blob['digest']}: damaged chunks {blob.get('damaged_chunks')}, "
                           f"{'repaired' if blob.get('repaired') else 'NOT repaired: ' + str(blob.get('error'))}")
    if report["unrepaired"]:
        ctx.exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(replication_group)
    cli.add_command(replicate_cmd)
    cli.add_command(rebalance_cmd)
    cli.add_command(migrate_cmd)
    cli.add_command(verify_cmd)
