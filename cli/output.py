"""Terminal output helpers: rich consoles that behave when piped, and JSON printing."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

__all__ = ["DocsGroup", "console", "echo_json", "plain_table"]


def console(*, err: bool = False) -> Console:
    """A rich console on stdout (or stderr); wide when not a terminal so piped tables never wrap."""
    stream = sys.stderr if err else sys.stdout
    is_tty = stream.isatty()
    return Console(file=stream, width=None if is_tty else 240, highlight=False, markup=False, soft_wrap=not is_tty)


def plain_table(*columns: str) -> Table:
    """A borderless table laid out like Ollama's ``list`` and ``ps``."""
    table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 4, 0, 0), header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True)
    return table


def echo_json(data: Any) -> None:
    """Print API JSON as received, indented."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class DocsGroup(click.Group):
    """Lists subcommands under "Available Commands", the heading the original docs grep for."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Available Commands"):
                formatter.write_dl(rows)
