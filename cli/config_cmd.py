"""``omx config init|show|validate``: write, print and check node configuration files."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from omx.cli.client import CliFailure, config_failure
from omx.cli.config_template import PROFILES, render_config
from omx.errors import ConfigError
from omx.fsutil import atomic_write
from omx.runtime.config import default_config_path, load_settings

__all__ = ["config_group"]


@click.group("config")
def config_group() -> None:
    """Create, show and validate node configuration."""


@config_group.command("init")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="default", show_default=True,
              help="Values tuned for this kind of machine.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--path", "target", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write (default: $OMX_HOME/config.yaml).")
def init_cmd(profile: str, force: bool, target: Path | None) -> None:
    """Write a commented config file for a profile."""
    path = (target or default_config_path()).expanduser()
    if path.exists() and not force:
        raise CliFailure(f"Error: {path} already exists (use --force to overwrite it)")
    text = render_config(profile)
    try:
        atomic_write(path, text, mode=0o600)  # it may hold API keys
    except OSError as exc:
        raise CliFailure(f"Error: cannot write {path}: {exc.strerror}") from exc
    click.echo(f"✅ Wrote {profile} configuration to {path}")


@config_group.command("show")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Config file (default: $OMX_HOME/config.yaml).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_cmd(config_path: Path | None, as_json: bool) -> None:
    """Print the effective settings (file + environment + defaults)."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise config_failure(exc) from exc
    data = settings.model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    source = config_path or default_config_path()
    origin = str(source) if source.exists() else f"defaults (no file at {source})"
    click.echo(f"# effective settings from {origin} and OMX_* environment variables")
    click.echo(f"# home: {settings.home}  store: {settings.store_path}")
    click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n"))


@config_group.command("validate")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
def validate_cmd(path: Path | None) -> None:
    """Check a config file (default: $OMX_HOME/config.yaml); exit 2 naming the bad key."""
    target = path or default_config_path()
    try:
        load_settings(target)
    except ConfigError as exc:
        raise config_failure(exc) from exc
    click.echo(f"✅ {target} is valid")
