"""Model commands that map one-to-one onto Ollama API calls: list, show, ps, rm, cp."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from omx.cli.client import client_for
from omx.cli.create import create_cmd
from omx.cli.format import (
    human_bytes,
    human_number,
    human_time,
    parse_timestamp,
    processor,
    short_digest,
)
from omx.cli.output import console, echo_json, plain_table

__all__ = ["copy_cmd", "create_cmd", "list_cmd", "ps_cmd", "rm_cmd", "show_cmd", "show_sections"]

_json_option = click.option("--json", "as_json", is_flag=True, help="Print the raw API JSON.")


@click.command("list")
@_json_option
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the models available in the cluster (this node's first)."""
    with client_for(ctx) as client:
        data = client.get("/api/tags")
    if as_json:
        echo_json(data)
        return
    now = datetime.now(UTC)
    table = plain_table("NAME", "ID", "SIZE", "MODIFIED")
    for model in data.get("models") or []:
        table.add_row(
            str(model.get("name") or model.get("model") or ""),
            short_digest(str(model.get("digest") or "")),
            human_bytes(int(model.get("size") or 0)),
            human_time(parse_timestamp(model.get("modified_at")), now=now, zero=""),
        )
    console().print(table)


@click.command("ps")
@_json_option
@click.pass_context
def ps_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the models loaded in memory on every node of the cluster."""
    with client_for(ctx) as client:
        data = client.get("/api/ps")
    if as_json:
        echo_json(data)
        return
    now = datetime.now(UTC)
    rows = data.get("models") or []
    by_node = any("node" in model for model in rows)  # a cluster node says where each model is loaded
    table = plain_table("NAME", "ID", "SIZE", "PROCESSOR", "UNTIL", *(("NODE",) if by_node else ()))
    for model in rows:
        size = int(model.get("size") or 0)
        expires = parse_timestamp(model.get("expires_at"))
        until = "Stopping..." if expires and expires < now else human_time(expires, now=now, zero="Never")
        table.add_row(
            str(model.get("name") or model.get("model") or ""),
            short_digest(str(model.get("digest") or "")),
            human_bytes(size),
            processor(size, int(model.get("size_vram") or 0)),
            until,
            *((str(model.get("node") or ""),) if by_node else ()),
        )
    console().print(table)


@click.command("rm")
@click.argument("models", nargs=-1, required=True)
@click.pass_context
def rm_cmd(ctx: click.Context, models: tuple[str, ...]) -> None:
    """Remove one or more models from every alive node of the cluster."""
    with client_for(ctx) as client:
        for name in models:
            client.request("DELETE", "/api/delete", json_body={"model": name})
            click.echo(f"deleted '{name}'")


@click.command("cp")
@click.argument("source")
@click.argument("destination")
@click.pass_context
def copy_cmd(ctx: click.Context, source: str, destination: str) -> None:
    """Copy a model under a new name."""
    with client_for(ctx) as client:
        client.post("/api/copy", {"source": source, "destination": destination})
    click.echo(f"copied '{source}' to '{destination}'")


_SHOW_FIELDS = {
    "modelfile": "",
    "parameters": "No parameters were specified for this model.",
    "template": "No prompt template was specified for this model.",
    "system": "No system message was specified for this model.",
    "license": "No license was specified for this model.",
}


@click.command("show")
@click.argument("model")
@click.option("--modelfile", "field", flag_value="modelfile", help="Show the Modelfile of the model.")
@click.option("--parameters", "field", flag_value="parameters", help="Show the parameters of the model.")
@click.option("--template", "field", flag_value="template", help="Show the template of the model.")
@click.option("--system", "field", flag_value="system", help="Show the system message of the model.")
@click.option("--license", "field", flag_value="license", help="Show the license of the model.")
@_json_option
@click.pass_context
def show_cmd(ctx: click.Context, model: str, field: str | None, as_json: bool) -> None:
    """Show information about a model."""
    with client_for(ctx) as client:
        data = client.post("/api/show", {"model": model})
    if as_json:
        echo_json(data)
        return
    if field:
        value = data.get(field)
        click.echo(str(value).rstrip("\n") if value else _SHOW_FIELDS[field])
        return
    out = console()
    for title, rows in show_sections(data):
        out.print(f"  {title}", style="bold")
        table = plain_table("", "")
        table.show_header = False
        for row in rows:
            table.add_row("    " + row[0], row[1] if len(row) > 1 else "")
        out.print(table)
        out.print()


def show_sections(data: dict[str, Any]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """The sections ``ollama show`` prints, from a ``/api/show`` answer (pure)."""
    info = data.get("model_info") or {}
    details = data.get("details") or {}
    arch = str(info.get("general.architecture") or details.get("family") or "")
    model_rows: list[tuple[str, ...]] = []
    if arch:
        model_rows.append(("architecture", arch))
    params = details.get("parameter_size")
    if not params and isinstance(info.get("general.parameter_count"), int):
        params = human_number(info["general.parameter_count"])
    if params:
        model_rows.append(("parameters", str(params)))
    for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
        if arch and info.get(f"{arch}.{key}") is not None:
            model_rows.append((label, str(info[f"{arch}.{key}"])))
    if details.get("quantization_level"):
        model_rows.append(("quantization", str(details["quantization_level"])))
    sections: list[tuple[str, list[tuple[str, ...]]]] = []
    if model_rows:
        sections.append(("Model", model_rows))
    if data.get("capabilities"):
        sections.append(("Capabilities", [(str(c),) for c in data["capabilities"]]))
    if data.get("parameters"):
        rows: list[tuple[str, ...]] = []
        for line in str(data["parameters"]).splitlines():
            name, _, value = line.strip().partition(" ")
            if name:
                rows.append((name, value.strip()))
        sections.append(("Parameters", rows))
    for key, title in (("system", "System"), ("license", "License")):
        if data.get(key):
            lines = [ln for ln in str(data[key]).strip().splitlines() if ln.strip()]
            # As Ollama: the first two lines, then an ellipsis.
            shown: list[tuple[str, ...]] = [(ln.strip(),) for ln in lines[:2]]
            if len(lines) > 2:
                shown.append(("...",))
            sections.append((title, shown))
    return sections
