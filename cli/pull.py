"""``omx pull``, ``omx push`` and the ``omx proxy`` aliases (``proxy pull``, ``proxy list``).

Pull and push draw one rich progress bar per layer (bytes, rate, ETA) from the
node's NDJSON progress lines; steps without bytes print as plain lines, as
Ollama's CLI does. ``proxy list`` shows every model with its size and status:
✅ Ready (complete here), ⏳ Downloading (partly here) and 💤 Available (held by
an alive peer, not here). Each status comes from one row source in
:data:`ROW_SOURCES`; the first source naming a model wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from omx.cli.client import CliFailure, NodeClient, client_for
from omx.cli.format import human_bytes
from omx.cli.output import DocsGroup, console, echo_json, plain_table

__all__ = ["ROW_SOURCES", "ProgressView", "proxy_group", "pull_cmd", "push_cmd", "register"]

READY, DOWNLOADING, AVAILABLE = "✅ Ready", "⏳ Downloading", "💤 Available"


class ProgressView:
    """Renders progress lines: a bar per digest, other statuses printed once each."""

    def __init__(self, out: Console, *, get_time: Callable[[], float] | None = None) -> None:
        self.out = out
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=out, transient=False, get_time=get_time,
        )
        self._tasks: dict[str, TaskID] = {}
        self._last_status = ""

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, line: dict[str, Any]) -> None:
        status = str(line.get("status", ""))
        digest = line.get("digest")
        if digest:
            total = int(line.get("total") or 0)
            task = self._tasks.get(digest)
            if task is None:
                task = self._tasks[digest] = self.progress.add_task(status, total=total or None)
            self.progress.update(task, completed=int(line.get("completed") or 0), total=total or None)
            return
        if status and status != self._last_status:
            self.progress.console.print(status)
            self._last_status = status


def _transfer(ctx: click.Context, path: str, model: str, insecure: bool) -> None:
    body = {"model": model, "insecure": insecure, "stream": True}
    with client_for(ctx) as client, ProgressView(console()) as view:
        for line in client.stream("POST", path, body):
            view.update(line)


_insecure = click.option("--insecure", is_flag=True, help="Use plain HTTP to reach the registry.")


@click.command("pull")
@click.argument("model")
@_insecure
@click.pass_context
def pull_cmd(ctx: click.Context, model: str, insecure: bool) -> None:
    """Pull a model: from a cluster peer that holds it, else from its registry."""
    _transfer(ctx, "/api/pull", model, insecure)


@click.command("push")
@click.argument("model")
@_insecure
@click.pass_context
def push_cmd(ctx: click.Context, model: str, insecure: bool) -> None:
    """Push a model to a registry."""
    _transfer(ctx, "/api/push", model, insecure)


def _self_id(client: NodeClient) -> str | None:
    try:
        nodes = client.get("/api/distributed/nodes").get("nodes") or []
    except CliFailure:
        return None
    return next((str(n.get("id")) for n in nodes if n.get("self")), None)


def _ready_rows(client: NodeClient) -> list[dict[str, Any]]:
    """Models this node holds (``/api/tags`` of a cluster node also lists those only peers hold)."""
    models = client.get("/api/tags").get("models") or []
    if any("held_by" in m for m in models):
        me = _self_id(client)
        models = [m for m in models if me is None or me in (m.get("held_by") or [me])]
    return [{"name": m["name"], "size": int(m.get("size") or 0), "status": READY} for m in models]


def _downloading_rows(client: NodeClient) -> list[dict[str, Any]]:
    try:
        pulls = client.get("/api/pulls").get("pulls") or []
    except CliFailure:
        return []  # a node without the registry handlers has no downloads to show
    return [{"name": p["name"], "size": int(p.get("size") or 0), "completed": int(p.get("completed") or 0),
             "status": DOWNLOADING} for p in pulls]


def _available_rows(client: NodeClient) -> list[dict[str, Any]]:
    """Models alive peers hold that this node does not (from their inventories)."""
    try:
        nodes = client.get("/api/distributed/nodes").get("nodes") or []
    except CliFailure:
        return []  # a node without cluster endpoints knows no peers
    rows: dict[str, dict[str, Any]] = {}
    for node in nodes:
        if node.get("self") or node.get("status") != "alive":
            continue
        sizes = node.get("model_sizes") or {}
        for name in node.get("models") or []:
            row = rows.setdefault(name, {"name": name, "size": int(sizes.get(name) or 0), "status": AVAILABLE,
                                         "holders": []})
            row["holders"].append(node.get("id"))
    return list(rows.values())


ROW_SOURCES: list[Callable[[NodeClient], list[dict[str, Any]]]] = [_ready_rows, _downloading_rows, _available_rows]
"""Where ``proxy list`` rows come from; the first source naming a model wins."""


def _rows(client: NodeClient, sources: Iterable[Callable[[NodeClient], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for source in sources:
        for row in source(client):
            seen.setdefault(row["name"], row)
    return list(seen.values())


@click.group("proxy", cls=DocsGroup)
def proxy_group() -> None:
    """🔗 Model management and proxy operations."""


@proxy_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def proxy_list_cmd(ctx: click.Context, as_json: bool) -> None:
    """List models with their size and status: ready here, downloading, or available on a peer."""
    with client_for(ctx) as client:
        rows = _rows(client, ROW_SOURCES)
    if as_json:
        echo_json({"models": rows})
        return
    table = plain_table("NAME", "SIZE", "STATUS")
    for row in rows:
        size = human_bytes(row["size"])
        if row["status"] == DOWNLOADING and row["size"]:
            size = f"{human_bytes(row['completed'])} / {size}"
        table.add_row(row["name"], size, row["status"])
    console().print(table)


proxy_group.add_command(pull_cmd, name="pull")


def register(cli_group: click.Group) -> None:
    """Add ``pull``, ``push`` and ``proxy`` to the ``omx`` group."""
    cli_group.add_command(pull_cmd)
    cli_group.add_command(push_cmd)
    cli_group.add_command(proxy_group)
