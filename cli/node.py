"""``omx start`` (a node in the foreground) and ``omx stop`` (signal the running one)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from omx.cli.client import (
    CliFailure,
    config_failure,
    ensure_home_env,
    node_file,
    pid_alive,
    read_node_file,
    split_host_port,
)
from omx.errors import ConfigError, OmxError
from omx.processes import start_ticks

__all__ = ["banner", "start_cmd", "start_overrides", "stop_cmd"]

STOP_DEADLINE_S = 30.0


def start_overrides(
    host: str | None,
    api_port: int | None,
    web_port: int | None,
    p2p_port: int | None,
    join: tuple[str, ...],
    token: str | None,
) -> dict[str, Any]:
    """Settings overrides from ``start``'s flags (pure). ``--host`` is ``host[:port]`` to bind."""
    overrides: dict[str, dict[str, Any]] = {}
    if host:
        bind, port = split_host_port(host, -1)
        if bind:
            overrides.setdefault("api", {})["host"] = bind
        if port >= 0:
            overrides.setdefault("api", {})["port"] = port
    if api_port is not None:
        overrides.setdefault("api", {})["port"] = api_port
    if web_port is not None:
        overrides.setdefault("web", {})["port"] = web_port
    if p2p_port is not None:
        overrides.setdefault("p2p", {})["port"] = p2p_port
    if join:
        overrides.setdefault("p2p", {})["join"] = list(join)
    if token:
        overrides.setdefault("cluster", {})["token"] = token
    return overrides


def _display_host(host: str) -> str:
    return "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1", "") else host


def banner(url: str, web_port: int | None, config_path: Path | None, h3_port: int | None = None) -> list[str]:
    """The lines printed once the node serves (pure); the docs' layout, honest about the web port."""
    api = url.rstrip("/")
    scheme, _, rest = api.partition("://")
    host = rest.rsplit(":", 1)[0].strip("[]")
    shown_host = _display_host(host)
    api_shown = f"{scheme}://{shown_host}:{rest.rsplit(':', 1)[1]}" if ":" in rest else api
    web = f"http://{shown_host}:{web_port}" if web_port else "off (web.enabled: false)"
    h3 = f"https://{shown_host}:{h3_port} (UDP; 'omx cluster ca' prints the CA)" if h3_port else \
        "off (api.http3: false)"
    return [
        "",
        f"Using configuration: {config_path if config_path else 'built-in defaults (no config file)'}",
        "",
        "✅ Node started successfully",
        "",
        "• Services:",
        f"   API:  {api_shown}",
        f"   HTTP/3: {h3}",
        f"   Web:  {web}",
        f"   Health: {api_shown}/health",
        "",
        "Use 'ollama-distributed status' to monitor the node.",
    ]


@click.command("start")
@click.option("--home", type=click.Path(file_okay=False), help="Root of every omx file (sets OMX_HOME).")
@click.option("--host", "bind", metavar="HOST[:PORT]", help="Address for the API to bind (default 127.0.0.1).")
@click.option("--api-port", type=click.IntRange(0, 65535), help="API port (default 8080).")
@click.option("--web-port", type=click.IntRange(0, 65535),
              help="Port of the web dashboard, on the API's address (default 8081; 0: any free port).")
@click.option("--p2p-port", type=click.IntRange(0, 65535), help="Gossip port (default 4001).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file.")
@click.option("--join", multiple=True, metavar="HOST:PORT", help="Peer to join (repeatable).")
@click.option("--token", help="Cluster join token.")
def start_cmd(
    home: str | None, bind: str | None, api_port: int | None, web_port: int | None, p2p_port: int | None,
    config_path: Path | None, join: tuple[str, ...], token: str | None,
) -> None:
    """Start a node in the foreground (Ctrl+C stops it)."""
    import asyncio

    from omx.runtime.config import default_config_path, load_settings

    ensure_home_env(home)
    overrides = start_overrides(bind, api_port, web_port, p2p_port, join, token)
    try:
        settings = load_settings(config_path, overrides)
    except ConfigError as exc:
        raise config_failure(exc) from exc
    try:
        from omx.runtime.node import NodeReady, run_node
    except ImportError as exc:
        raise CliFailure(f"omx: this installation cannot run a node ({exc})") from exc

    click.echo("• Starting OllamaMax node...")
    fallback = config_path or (default_config_path() if default_config_path().exists() else None)

    def on_ready(ready: NodeReady) -> None:
        for line in banner(ready.url, ready.web_port, ready.config_path or fallback, ready.h3_port):
            click.echo(line)

    try:
        asyncio.run(run_node(settings, on_ready=on_ready, config_path=fallback))
    except KeyboardInterrupt:
        pass
    except ConfigError as exc:
        raise config_failure(exc) from exc
    except OmxError as exc:
        raise CliFailure(f"Error: {exc.message}") from exc
    click.echo("Node stopped.")


@click.command("stop")
@click.option("--home", type=click.Path(file_okay=False), help="Root of every omx file (sets OMX_HOME).")
@click.option("--timeout", "deadline", type=float, default=STOP_DEADLINE_S, show_default=True,
              help="Seconds to wait for the node to exit.")
def stop_cmd(home: str | None, deadline: float) -> None:
    """Stop the node started from this home (SIGTERM, then wait for it to exit)."""
    ensure_home_env(home)
    info = read_node_file()
    pid = info.get("pid") if info else None
    if info is None or not isinstance(pid, int) or pid <= 0:
        raise CliFailure(f"omx: no node is running (no {node_file()})")
    label = f"{info.get('node_id') or 'node'} (pid {pid})"
    # A pidfd names this process even if it exits and its pid is reused while we check and signal.
    with _pidfd(pid) as pidfd:
        if not pid_alive(pid):
            node_file().unlink(missing_ok=True)
            raise CliFailure(f"omx: no node is running (pid {pid} from {node_file()} has exited; removed it)")
        stranger = _not_the_node(pid, info)
        if stranger is not None:
            node_file().unlink(missing_ok=True)
            raise CliFailure(f"omx: no node is running: pid {pid} from {node_file()} is now another process "
                             f"({stranger}); left it alone and removed the stale file")
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            click.echo(f"Node {label} already exited.")
            return
        except PermissionError as exc:
            raise CliFailure(f"omx: not allowed to signal pid {pid}: {exc.strerror}") from exc
        if not _wait_exit(pid, pidfd, deadline):
            raise CliFailure(f"omx: node {label} did not exit within {deadline:g} s")
    click.echo(f"Stopped node {label}.")


def _not_the_node(pid: int, info: dict[str, Any]) -> str | None:
    """Why live process ``pid`` is not the node that wrote ``info``; None when it is."""
    recorded = info.get("start_ticks")
    if isinstance(recorded, int):
        started = start_ticks(pid)
        if started is None or started == recorded:
            return None  # unreadable: it exited meanwhile, and the signal will say so
        return "it started after the node that wrote the file"
    # A file without a start time (written by an older omx): only an omx process qualifies.
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "its command line cannot be read"
    if "omx" in command or "ollama-distributed" in command:
        return None
    return f"its command is {command[:80]!r}"


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd for ``pid`` (Linux 5.3+), or None where there is none."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _wait_exit(pid: int, pidfd: int | None, deadline: float) -> bool:
    """Wait up to ``deadline`` seconds for the process to exit; True once it has."""
    end = time.monotonic() + deadline
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        while not poller.poll(max(0.0, end - time.monotonic()) * 1000):
            if time.monotonic() >= end:
                return False
        return True
    while pid_alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True
