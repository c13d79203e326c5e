"""``omx import-ollama``: find Ollama model stores and use their models in omx.

Modes:

* ``detect`` lists the Ollama stores found, their models and sizes, and
  whether an Ollama server is listening;
* ``migrate`` brings the models into the omx store (hard links on the same
  filesystem, copies otherwise; every blob hashed and its chunk index built);
* ``coexist`` registers each Ollama store as a read-only extra store
  (``models.extra_stores`` in the config file): models are served in place;
* ``replace`` migrates, after copying the Ollama store aside when
  ``--backup-original`` is given, and, unless ``--preserve-models``, then
  removes the migrated models from the Ollama store (after confirmation).

This command works on files, not through a node: it reads the config to find
the omx store, and a running node sees config changes after a restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from omx.cli.client import CliFailure, config_failure, normalize_url, pid_alive, read_node_file
from omx.cli.format import human_bytes, short_digest
from omx.cli.output import console, echo_json, plain_table
from omx.errors import ConfigError, OmxError
from omx.fsutil import atomic_write
from omx.runtime.config import Settings, default_config_path, load_settings
from omx.storage.blobs import BlobStore
from omx.storage.ollama_import import (
    MigrationReport,
    OllamaStore,
    backup_store,
    find_stores,
    migrate,
    remove_models,
    scan_store,
)

__all__ = ["OllamaServer", "import_ollama_cmd", "ollama_url", "probe_ollama", "register"]

OLLAMA_DEFAULT_PORT = 11434
MODES = ("detect", "migrate", "coexist", "replace")


# ------------------------------------------------------------------ the Ollama server


def ollama_url(value: str | None = None) -> str:
    """The URL Ollama's clients use, from ``OLLAMA_HOST`` as Ollama reads it.

    No scheme means ``http`` with port 11434; ``http://host`` alone means port
    80 and ``https://host`` 443; an empty or wildcard host means loopback.
    """
    text = os.environ.get("OLLAMA_HOST", "") if value is None else value
    return normalize_url(text, OLLAMA_DEFAULT_PORT, scheme_ports=True)


@dataclass(frozen=True)
class OllamaServer:
    """What answered at ``url``: ``listening`` is any HTTP answer, ``version`` Ollama's own."""

    url: str
    listening: bool
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "listening": self.listening, "version": self.version}


def probe_ollama(url: str | None = None, *, timeout: float = 1.5) -> OllamaServer:
    """``GET /api/version`` on the Ollama server; never raises."""
    url = url or ollama_url()
    try:
        response = httpx.get(f"{url}/api/version", timeout=timeout)
    except httpx.HTTPError:
        return OllamaServer(url, listening=False)
    try:
        body = response.json()
    except ValueError:
        body = None
    version = body.get("version") if isinstance(body, dict) else None
    return OllamaServer(url, listening=True, version=str(version) if version else None)


# ------------------------------------------------------------------ the config file


def edit_extra_stores(
    config: Path, *, add: Sequence[Path] = (), remove: Sequence[Path] = ()
) -> list[Path]:
    """Add and remove paths in ``models.extra_stores`` of ``config``; return the new list.

    The YAML is loaded, changed and validated as a whole configuration before
    it atomically replaces the file; other keys are kept (comments are not).
    The file is not touched when nothing changes.
    """
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {config} is not valid YAML: {e}") from e
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {config} must hold a mapping of sections")
    models = data.setdefault("models", {}) or {}
    if not isinstance(models, dict):
        raise ConfigError(f"config file {config}: 'models' must be a mapping", key="models")
    data["models"] = models
    current = [str(p) for p in (models.get("extra_stores") or [])]
    gone = {Path(p).resolve() for p in remove}
    kept = [p for p in current if Path(p).expanduser().resolve() not in gone]
    known = {Path(p).expanduser().resolve() for p in kept}
    kept += [str(p) for p in add if p.resolve() not in known]
    if kept == current:
        return [Path(p) for p in kept]
    models["extra_stores"] = kept
    mode = config.stat().st_mode & 0o777 if config.exists() else 0o600
    atomic_write(config, yaml.safe_dump(data, sort_keys=False), mode=mode, check=load_settings)
    return [Path(p) for p in kept]


def _running_node() -> int | None:
    info = read_node_file()
    pid = info.get("pid") if info else None
    return pid if isinstance(pid, int) and pid_alive(pid) else None


# ------------------------------------------------------------------ output


def _store_dict(store: OllamaStore) -> dict[str, Any]:
    return {
        "path": str(store.path),
        "origin": store.origin,
        "size": store.size,
        "problems": list(store.problems),
        "models": [
            {"name": m.name.display, "model": m.name.full, "size": m.size, "digest": m.digest,
             "blobs": m.blob_count, "complete": m.complete, "missing": list(m.missing),
             "modified_at": m.modified}
            for m in store.models
        ],
    }


def _report_dict(report: MigrationReport) -> dict[str, Any]:
    return {
        "source": str(report.source),
        "target": str(report.target),
        "linked": report.count("linked"), "copied": report.count("copied"), "present": report.count("present"),
        "bytes_linked": report.bytes("linked"), "bytes_copied": report.bytes("copied"),
        "models": [
            {"name": m.name.display, "status": m.status, "error": m.error,
             "blobs": [{"digest": b.digest, "size": b.size, "action": b.action} for b in m.blobs]}
            for m in report.models
        ],
    }


def _print_store(store: OllamaStore) -> None:
    out = console()
    out.print(f"Ollama store: {store.path} ({store.origin}), {len(store.models)} models, "
              f"{human_bytes(store.size)}")
    if store.models:
        table = plain_table("NAME", "ID", "SIZE", "BLOBS", "STATUS")
        for m in store.models:
            state = "complete" if m.complete else f"incomplete ({len(m.missing)} blobs missing)"
            table.add_row(m.name.display, short_digest(m.digest), human_bytes(m.size), str(m.blob_count), state)
        out.print(table)
    for problem in store.problems:
        click.echo(f"Warning: unreadable manifest {problem}", err=True)


def _print_report(report: MigrationReport) -> None:
    for m in report.models:
        line = f"{m.status:>8}  {m.name.display}"
        if m.error:
            line += f": {m.error}"
        click.echo(line, err=m.status in ("failed", "conflict"))
    click.echo(f"{report.count('linked')} blobs hard-linked ({human_bytes(report.bytes('linked'))}), "
               f"{report.count('copied')} copied ({human_bytes(report.bytes('copied'))}), "
               f"{report.count('present')} already held, into {report.target}")


# ------------------------------------------------------------------ the command


@click.command("import-ollama")
@click.option("-m", "--mode", type=click.Choice(MODES), default="detect", show_default=True,
              help="detect: list Ollama models; migrate: bring them into omx; coexist: serve them in place; "
                   "replace: migrate and retire the Ollama copy.")
@click.option("--source", type=click.Path(path_type=Path, file_okay=False),
              help="The Ollama models folder (default: $OLLAMA_MODELS, ~/.ollama/models, "
                   "/usr/share/ollama/.ollama/models).")
@click.option("--preserve-models", is_flag=True, help="replace: keep the models in the Ollama store.")
@click.option("--backup-original", is_flag=True, help="replace: copy the Ollama store aside first.")
@click.option("--model", "names", multiple=True, metavar="NAME", help="Only these models (repeatable).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Config file to read and, for coexist, change (default: $OMX_HOME/config.yaml).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before removing Ollama's models.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def import_ollama_cmd(
    ctx: click.Context, mode: str, source: Path | None, preserve_models: bool, backup_original: bool,
    names: tuple[str, ...], config_file: Path | None, yes: bool, as_json: bool,
) -> None:
    """Detect, migrate, serve in place (coexist) or replace an Ollama model store."""
    root_obj = ctx.find_root().obj or {}
    config_file = config_file or root_obj.get("config")
    try:
        settings = load_settings(config_file)
        stores = _stores(source, settings)
        if mode == "detect":
            _detect(stores, settings, as_json)
        elif mode == "coexist":
            _coexist(stores, config_file or default_config_path(), as_json)
        else:
            _migrate(stores, settings, config_file or default_config_path(), mode, list(names) or None,
                     preserve_models, backup_original, yes, as_json)
    except ConfigError as e:
        raise config_failure(e) from e
    except OmxError as e:
        raise CliFailure(f"Error: {e.message}") from e
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise CliFailure(f"Error: {e.strerror or e}{where}") from e


def _stores(source: Path | None, settings: Settings) -> list[OllamaStore]:
    own = settings.store_path.expanduser().resolve()
    return [scan_store(path, origin) for origin, path in find_stores(source) if path != own]


def _detect(stores: list[OllamaStore], settings: Settings, as_json: bool) -> None:
    server = probe_ollama()
    if as_json:
        echo_json({"stores": [_store_dict(s) for s in stores], "ollama_server": server.to_dict(),
                   "omx_store": str(settings.store_path)})
        return
    if not stores:
        click.echo("No Ollama model store found.")
    for store in stores:
        _print_store(store)
    state = f"listening (version {server.version})" if server.version else "listening"
    click.echo(f"Ollama server at {server.url}: {state if server.listening else 'not running'}")


def _coexist(stores: list[OllamaStore], config: Path, as_json: bool) -> None:
    if not stores:
        raise CliFailure("Error: no Ollama model store found (use --source PATH)")
    extra = edit_extra_stores(config, add=[s.path for s in stores])
    pid = _running_node()
    if as_json:
        echo_json({"config": str(config), "extra_stores": [str(p) for p in extra],
                   "stores": [_store_dict(s) for s in stores], "node_running": pid is not None})
        return
    for store in stores:
        click.echo(f"Serving {len(store.models)} Ollama models in place from {store.path} (read-only, no copy)")
    click.echo(f"Updated models.extra_stores in {config}")
    if pid is not None:
        click.echo(f"A node is running (pid {pid}): restart it (omx stop; omx start) to serve these models.")


def _migrate(
    stores: list[OllamaStore], settings: Settings, config: Path, mode: str, names: list[str] | None,
    preserve: bool, backup: bool, yes: bool, as_json: bool,
) -> None:
    if not stores:
        raise CliFailure("Error: no Ollama model store found (use --source PATH)")
    removing = mode == "replace" and not preserve
    if removing:
        server = probe_ollama()
        if server.listening:
            raise CliFailure(f"Error: an Ollama server is listening at {server.url}; stop it before its "
                             "models are removed, or add --preserve-models")
    backups: list[str] = []
    if mode == "replace" and backup:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for store in stores:
            dest = settings.home / "backups" / f"ollama-{stamp}"
            n = 1
            while dest.exists():
                n += 1
                dest = settings.home / "backups" / f"ollama-{stamp}-{n}"
            backups.append(str(backup_store(store.path, dest)))
            if not as_json:
                click.echo(f"Backed up {store.path} to {dest}")
    blobs = BlobStore(settings.store_path, chunk_size=settings.models.chunk_size)
    reports = [migrate(store, blobs, names=names) for store in stores]
    removed: list[str] = []
    if not as_json:
        for report in reports:
            _print_report(report)
    if removing:
        for store, report in zip(stores, reports, strict=True):
            ready = [m for m in report.models if m.ok]
            if not ready:
                continue
            if not yes and not click.confirm(
                f"Remove {len(ready)} migrated models from the Ollama store at {store.path}?", err=True
            ):
                continue
            removed += [str(p) for p in remove_models(store, report, blobs)]
            if not scan_store(store.path).models:
                edit_extra_stores(config, remove=[store.path])
        if not as_json:
            click.echo(f"Removed {len(removed)} files from the Ollama store")
    if as_json:
        echo_json({"mode": mode, "backups": backups, "removed": removed,
                   "reports": [_report_dict(r) for r in reports]})
    if any(m.status == "failed" for r in reports for m in r.models):
        raise CliFailure("Error: some models could not be imported (see above)")


def register(cli_group: click.Group) -> None:
    """Add ``import-ollama`` to the ``omx`` command group."""
    cli_group.add_command(import_ollama_cmd)
