"""The ``omx`` command group (also installed as ``ollama-distributed``).

Only wiring lives here: each command family is its own module. Heavy imports
(the node itself) happen inside the commands so ``omx --help`` stays fast.
"""

from __future__ import annotations

import json
from importlib import metadata

import click

from omx.cli.client import NodeClient, ca_file, discover_url
from omx.cli.cluster import cluster_group
from omx.cli.config_cmd import config_group
from omx.cli.fn import register as register_fn
from omx.cli.import_ollama import register as register_import_ollama
from omx.cli.models import copy_cmd, create_cmd, list_cmd, ps_cmd, rm_cmd, show_cmd
from omx.cli.node import start_cmd, stop_cmd
from omx.cli.output import DocsGroup
from omx.cli.pull import register as register_pull
from omx.cli.replication import register as register_replication
from omx.cli.run import run_cmd
from omx.cli.status import nodes_cmd, status_cmd
from omx.cli.troubleshoot import troubleshoot_cmd

__all__ = ["cli", "client_version", "main"]


def client_version() -> str:
    """The installed omx version."""
    try:
        return metadata.version("omx")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"omx version is {client_version()}")
        ctx.exit(0)


@click.group(cls=DocsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--host",
    envvar="OMX_HOST",
    metavar="URL",
    help="Node to talk to (default: the running node's run/node.json, else the config's api address).",
)
@click.option(
    "--http3", is_flag=True, envvar="OMX_HTTP3",
    help="Talk HTTP/3 (QUIC, TLS) to the node, trusting only the cluster CA (--ca).",
)
@click.option(
    "--ca", "ca", metavar="FILE", type=click.Path(dir_okay=False),
    help="Cluster CA certificate for --http3 (default: $OMX_HOME/tls/ca.crt; 'omx cluster ca' prints it).",
)
@click.option(
    "--version", "-v", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Show the version and exit.",
)
@click.pass_context
def cli(ctx: click.Context, host: str | None, http3: bool, ca: str | None) -> None:
    """omx: a distributed, Ollama-compatible model runtime."""
    ctx.ensure_object(dict)
    ctx.obj["host"] = host
    ctx.obj["http3"] = http3
    ctx.obj["ca"] = ca


@cli.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def version_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show the client version and, when one answers, the node's."""
    http3 = bool(ctx.obj.get("http3"))
    url = discover_url(ctx.obj.get("host"), http3=http3)
    node_version: str | None = None
    client = NodeClient(url, timeout=3.0, ca=ca_file(ctx.obj.get("ca")) if http3 else None)
    try:
        node_version = str(client.get("/api/version").get("version"))
    except click.ClickException:
        node_version = None
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps({"version": client_version(), "node": {"url": url, "version": node_version}}))
        return
    click.echo(f"omx version is {client_version()}")
    if node_version is None:
        click.echo(f"Warning: could not connect to a running node at {url}", err=True)
    elif node_version != client_version():
        click.echo(f"node version is {node_version}")


cli.add_command(start_cmd)
cli.add_command(stop_cmd)
cli.add_command(list_cmd)
cli.add_command(list_cmd, name="ls")
cli.add_command(show_cmd)
cli.add_command(create_cmd)
cli.add_command(run_cmd)
cli.add_command(ps_cmd)
cli.add_command(rm_cmd)
cli.add_command(copy_cmd)
cli.add_command(config_group)
cli.add_command(status_cmd)
cli.add_command(nodes_cmd)
cli.add_command(troubleshoot_cmd)
cli.add_command(cluster_group)
register_import_ollama(cli)
register_pull(cli)
register_replication(cli)
register_fn(cli)


def main() -> None:
    """Console-script entry point."""
    cli()
