"""``omx fn deploy|ls|invoke|logs|rollback|rm``: custom functions on the cluster.

Each command asks the node (``/api/functions``, ``/fn/...``); the read commands
take ``--json``. Any refusal (a source that does not import, a conflict, an
unknown function) prints the node's message and exits 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from omx.cli.client import CliFailure, NodeClient, client_for
from omx.cli.output import console, echo_json, plain_table

__all__ = ["register"]


def _client(ctx: click.Context, timeout: float = 60.0) -> NodeClient:
    client = client_for(ctx)
    client.timeout = timeout
    return client


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


def _when(stamp: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp)))
    except (TypeError, ValueError):
        return "-"


@click.group("fn")
def fn_group() -> None:
    """Custom functions: deploy Python handlers that every node serves under /fn/."""


@fn_group.command("deploy")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def deploy_cmd(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Deploy the functions of a Python FILE to the cluster (a redeploy replaces them)."""
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliFailure(f"omx: cannot read {file}: {exc}") from exc
    with _client(ctx, timeout=120.0) as client:
        result = client.post("/api/functions", {"filename": file.name, "source": source})
    if as_json:
        echo_json(result)
        return
    for f in result.get("functions", []):
        click.echo(f"deployed {f['name']} at {f['path']} (version {str(f['version'])[:12]})")


@fn_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """The functions of the cluster: version, path, serving nodes, calls, errors, latency."""
    with _client(ctx) as client:
        result = client.get("/api/functions")
    if as_json:
        echo_json(result)
        return
    table = plain_table("NAME", "VERSION", "PATH", "NODES", "CALLS", "ERRORS", "P50 MS", "P99 MS", "DEPLOYED")
    for f in result.get("functions", []):
        table.add_row(str(f["name"]), str(f["version"])[:12], str(f["path"]), ", ".join(f.get("nodes", [])) or "-",
                      str(f.get("calls", 0)), str(f.get("errors", 0)), _ms(f.get("p50_ms")), _ms(f.get("p99_ms")),
                      _when(f.get("deployed_at")))
    console().print(table)


def _function(client: NodeClient, name: str) -> dict[str, Any]:
    row: dict[str, Any] = client.get(f"/api/functions/{name}")
    return row


@fn_group.command("invoke")
@click.argument("name")
@click.argument("body", required=False)
@click.option("--method", "-X", default=None, help="HTTP method (default: the function's first one).")
@click.pass_context
def invoke_cmd(ctx: click.Context, name: str, body: str | None, method: str | None) -> None:
    """Call function NAME with a JSON BODY (default {}); prints its answer as JSON (a streamed one item by line)."""
    try:
        payload = json.loads(body) if body else {}
    except ValueError as exc:
        raise CliFailure(f"omx: BODY is not valid JSON: {exc}") from exc
    with _client(ctx) as client:
        row = _function(client, name)
        verb = (method or (row.get("methods") or ["POST"])[0]).upper()
        for item in client.stream(verb, str(row["path"]), None if verb == "GET" else payload):
            click.echo(json.dumps(item))


@fn_group.command("logs")
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines as they come (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="Print each row as JSON.")
@click.pass_context
def logs_cmd(ctx: click.Context, name: str, follow: bool, as_json: bool) -> None:
    """The lines function NAME logged (ctx.log) on every node."""

    def show(row: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(f"{_when(row.get('time'))} {row.get('node')} {str(row.get('version'))[:12]} {row.get('line')}")

    with _client(ctx) as client:
        if not follow:
            for row in client.get(f"/api/functions/{name}/logs").get("logs", []):
                show(row)
            return
        try:
            for row in client.stream("GET", f"/api/functions/{name}/logs?follow=true", None):
                show(row)
        except KeyboardInterrupt:
            return


@fn_group.command("rollback")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
def rollback_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """Return function NAME to its previous version on every node."""
    with _client(ctx) as client:
        result = client.post(f"/api/functions/{name}/rollback", {})
    if as_json:
        echo_json(result)
        return
    click.echo(f"{result['name']} is back on version {str(result['version'])[:12]} at {result['path']}")


@fn_group.command("rm")
@click.argument("name")
@click.pass_context
def rm_cmd(ctx: click.Context, name: str) -> None:
    """Remove function NAME from every node."""
    with _client(ctx) as client:
        client.request("DELETE", f"/api/functions/{name}")
    click.echo(f"deleted {name}")


def register(cli: click.Group) -> None:
    cli.add_command(fn_group)
