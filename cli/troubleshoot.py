"""``omx troubleshoot``: real checks of this machine's node, each ✅ or ❌ with a one-line fix.

Like ``start`` and ``config``, it reads local files (config, ``run/node.json``, the
store) as well as the node's API, since a node that does not run cannot be asked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx

from omx.cli.checks import (
    Check,
    disk_verdict,
    memory_verdict,
    our_pids,
    port_bindable,
    port_owner,
    port_verdict,
    serf_binary,
    unreachable_peers,
    verify_blob_sample,
)
from omx.cli.client import CliFailure, auth_headers, discover_url, normalize_url, pid_alive, read_node_file
from omx.cli.output import console
from omx.cli.status_view import RULE
from omx.errors import ConfigError, OmxError
from omx.runtime.config import Settings, default_config_path, load_settings, omx_home

__all__ = ["Context", "report_lines", "run_checks", "troubleshoot_cmd"]

_HTTP_TIMEOUT_S = 3.0
_ICONS = {"ok": "✅", "warn": "⚠️", "fail": "❌", "skip": "➖"}


@dataclass
class Context:
    """What the checks share: settings (None when invalid), the node found and its health."""

    config_path: Path
    settings: Settings | None
    config_error: str | None
    url: str
    node_pid: int | None
    node_info: dict[str, Any]
    health: dict[str, Any] | None = None
    deep: bool = False


def _get_json(url: str, path: str) -> Any:
    response = httpx.get(url + path, timeout=_HTTP_TIMEOUT_S, headers=auth_headers())
    response.raise_for_status()
    return response.json()


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    return str(body["error"]) if isinstance(body, dict) and body.get("error") else response.reason_phrase


def _gather(host: str | None, config_file: Path | None, deep: bool) -> Context:
    path = config_file or default_config_path()
    settings, error = None, None
    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        error = exc.message
    info = read_node_file() or {}
    pid = info.get("pid") if isinstance(info.get("pid"), int) else None
    alive_pid = pid if pid is not None and pid_alive(pid) else None
    try:
        url = discover_url(host, config_file)
    except CliFailure:
        url = normalize_url(str(info.get("url") or "127.0.0.1:8080"))
    return Context(path, settings, error, url, alive_pid, info if alive_pid else {}, deep=deep)


def check_running(ctx: Context, explicit_host: bool) -> Check:
    label = "if service is running"
    try:
        health = _get_json(ctx.url, "/health")
        ctx.health = health if isinstance(health, dict) else None
    except httpx.HTTPStatusError as exc:
        return Check("running", label, "fail",
                     f"{ctx.url} answers /health with {exc.response.status_code}: {_error_text(exc.response)}",
                     "check the node's log, then restart it: omx stop && omx start")
    except (httpx.HTTPError, ValueError):
        ctx.health = None
    if ctx.health is not None:
        return Check("running", label, "ok", f"node {ctx.health.get('node_id')} at {ctx.url}")
    if ctx.node_pid is not None:
        return Check("running", label, "fail", f"node process {ctx.node_pid} runs but {ctx.url} does not answer",
                     "check the node's log, then restart it: omx stop && omx start")
    where = f"at {ctx.url}" if explicit_host else f"from {omx_home()}"
    return Check("running", label, "fail", f"no node is running {where}", "start one with 'omx start'")


def check_ports(ctx: Context) -> Check:
    label = "port availability"
    settings, info = ctx.settings, ctx.node_info
    if settings is None and not info:
        return Check("ports", label, "skip", "configuration is invalid")
    api_host = str(info.get("host") or (settings.api.host if settings else "127.0.0.1"))
    wanted = [("api", api_host, info.get("api_port") or (settings.api.port if settings else 8080))]
    if settings is not None:
        # A running node says where it actually bound; the config says where the next one will.
        gossip = str(info.get("p2p_address") or "")
        p2p_host = gossip.rsplit(":", 1)[0].strip("[]") if gossip else settings.p2p.bind or settings.api.host
        if settings.web.enabled:
            wanted.append(("web", api_host, info.get("web_port") or settings.web.port))
        wanted.append(("p2p", p2p_host, info.get("p2p_port") or settings.p2p.port))
    ours = our_pids(ctx.node_pid)
    taken = []
    for role, host, port in wanted:
        if not isinstance(port, int) or port <= 0:
            continue  # 0 asks the kernel for any free port
        host = "0.0.0.0" if host in ("", "*") else host
        free = port_bindable(host, port)
        problem = port_verdict(role, port, free, None if free else port_owner(port, host), ours)
        if problem:
            taken.append(problem)
    if taken:
        return Check("ports", label, "fail", "; ".join(taken),
                     "stop that program or choose other ports (api.port, web.port, p2p.port in config.yaml)")
    return Check("ports", label, "ok")


def check_serf(ctx: Context) -> Check:
    from omx.mesh import serf_available

    binary = serf_binary()
    ok, version = serf_available(binary)
    if ok:
        return Check("serf", "serf", "ok", f"serf {version or '(unknown version)'} ({shutil.which(binary)})")
    return Check("serf", "serf", "fail", f"the serf binary {binary!r} is not installed or does not run",
                 "install it (apt install serf) or set OMX_SERF_BINARY; without it the node runs alone")


def check_agent(ctx: Context, serf_ok: bool) -> Check:
    label = "serf agent"
    health = ctx.health
    if health is None:
        return Check("agent", label, "skip", "node not running")
    services = health.get("services") or {}
    if services.get("p2p"):
        peers = int(services.get("p2p_peers") or 0)
        return Check("agent", label, "ok", f"alive, {peers} peer{'s' if peers != 1 else ''}")
    fix = "restart the node (omx stop && omx start) and read its log"
    if health.get("membership") == "standalone":
        if not serf_ok:
            return Check("agent", label, "skip", "serf is not installed: the node runs alone")
        return Check("agent", label, "fail", "the node runs standalone although serf is installed", fix)
    return Check("agent", label, "fail", "the node's serf agent is not running (no gossip, no peers)", fix)


def check_peers(ctx: Context) -> Check:
    label = "peer connectivity"
    if ctx.health is None:
        return Check("peers", label, "skip", "node not running")
    try:
        nodes = _get_json(ctx.url, "/api/distributed/nodes").get("nodes") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return Check("peers", label, "fail", f"the node's member list is unavailable ({exc})",
                     "check the node's log")
    peers = [n for n in nodes if isinstance(n, dict) and not n.get("self")]
    bad = unreachable_peers(peers, _HTTP_TIMEOUT_S)
    if bad:
        return Check("peers", label, "fail", "no answer from " + ", ".join(bad),
                     "check that those nodes run and that their API address is reachable from here")
    down = [f"{n.get('id')} {n.get('status')}" for n in peers if n.get("status") in ("failed", "suspect")]
    alive = sum(1 for n in peers if n.get("status") == "alive")
    detail = f"{alive} peer{'s' if alive != 1 else ''} answer" if alive else "no peers (single node)"
    if down:
        return Check("peers", label, "warn", f"{detail}; " + ", ".join(down),
                     "restart the failed nodes, or 'omx cluster leave' on nodes that should go")
    return Check("peers", label, "ok", detail)


def _store_path(ctx: Context) -> Path:
    return ctx.settings.store_path if ctx.settings else omx_home() / "data" / "models"


def check_disk(ctx: Context) -> Check:
    store = _store_path(ctx)
    probe = store
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    blobs = store / "blobs"
    used = sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0
    max_cache = ctx.settings.models.max_cache_size if ctx.settings else 10 * 10**9
    outcome, detail = disk_verdict(usage.free, usage.total, max_cache, used)
    return Check("disk", "disk space", outcome, f"{detail} at {probe}",
                 "free disk space, or move the store (models.store_path) to a bigger disk")


def check_memory(ctx: Context) -> Check:
    import psutil

    memory = psutil.virtual_memory()
    outcome, detail = memory_verdict(memory.available, memory.total)
    return Check("memory", "memory", outcome, detail,
                 "close other programs or lower engine.max_loaded_models")


def check_config(ctx: Context) -> Check:
    if ctx.config_error:
        return Check("config", "configuration", "fail", ctx.config_error,
                     f"fix that key in {ctx.config_path} (check with 'omx config validate')")
    source = str(ctx.config_path) if ctx.config_path.exists() else "defaults"
    return Check("config", "configuration", "ok", source)


def check_store(ctx: Context) -> Check:
    label = "model store"
    if ctx.settings is None:
        return Check("store", label, "skip", "configuration is invalid")
    from omx.storage import ModelStore

    root = ctx.settings.store_path
    if not (root / "manifests").is_dir():
        return Check("store", label, "ok", f"empty (no store yet at {root})")
    fix = "remove the model using it (omx rm MODEL) and pull it again (omx pull MODEL)"
    try:
        store = ModelStore(root, chunk_size=ctx.settings.models.chunk_size,
                           extra_roots=tuple(ctx.settings.models.extra_stores))
        found = store.check_sync(deep=ctx.deep)
        if not ctx.deep:
            for digest in store.blobs.digests():
                index = store.blobs.stored_index(digest)
                path = store.blobs.own_path(digest)
                if index is None or index.size != path.stat().st_size:
                    continue  # check_sync already reported it
                bad = verify_blob_sample(path, index)
                if bad is not None:
                    found.append(f"blob {digest} is corrupt (chunk {bad} does not match its hash)")
    except (OmxError, OSError) as exc:
        return Check("store", label, "fail", f"cannot read the store at {root}: {exc}", fix)
    if found:
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        return Check("store", label, "fail", found[0] + more, fix)
    return Check("store", label, "ok", f"{len(store.blobs.digests())} blobs verified at {root}")


def check_sandbox(ctx: Context) -> Check:
    from omx.runtime.sandbox import probe_sandbox

    problem = probe_sandbox()
    if problem is None:
        return Check("sandbox", "function sandbox", "ok", f"bubblewrap ({shutil.which('bwrap')}) starts workers")
    return Check("sandbox", "function sandbox", "warn", problem,
                 "install bubblewrap (apt install bubblewrap) and allow user namespaces; "
                 "until then the node refuses custom functions")


def run_checks(host: str | None, config_file: Path | None, *, deep: bool = False) -> list[Check]:
    """Every check, in the order they are shown."""
    ctx = _gather(host, config_file, deep)
    serf = check_serf(ctx)
    steps: list[Callable[[], Check]] = [
        lambda: check_running(ctx, bool(host)), lambda: check_ports(ctx), lambda: serf,
        lambda: check_agent(ctx, serf.outcome == "ok"), lambda: check_peers(ctx),
        lambda: check_disk(ctx), lambda: check_memory(ctx), lambda: check_config(ctx), lambda: check_store(ctx),
        lambda: check_sandbox(ctx),
    ]
    return [step() for step in steps]


def report_lines(checks: list[Check], *, verbose: bool = False) -> list[str]:
    """The docs' layout: a header, one line per check (details/fix under problems), a verdict."""
    lines = ["🔧 OllamaMax Troubleshooting", RULE * 28, "Diagnosing common issues...", ""]
    for check in checks:
        line = f"Checking {check.label}... {_ICONS[check.outcome]}"
        if check.detail and (verbose or check.outcome != "ok" or check.key in ("serf", "agent", "peers")):
            line += f" {check.detail}"
        lines.append(line)
        if check.outcome in ("fail", "warn") and check.fix:
            lines.append(f"   Fix: {check.fix}")
    failed = sum(1 for c in checks if c.outcome == "fail")
    lines.append("")
    if failed:
        lines += [f"❌ {failed} issue{'s' if failed != 1 else ''} found.",
                  "Apply the fixes above, then run 'omx troubleshoot' again."]
    else:
        lines += ["✅ No issues detected!", "Your OllamaMax installation looks healthy."]
    return lines


@click.command("troubleshoot")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Config file (default: $OMX_HOME/config.yaml).")
@click.option("--deep", is_flag=True, help="Re-hash every blob of the store (slow on large models).")
@click.option("--verbose", is_flag=True, help="Show what each passing check found.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def troubleshoot_cmd(ctx: click.Context, config_path: Path | None, deep: bool, verbose: bool,
                     as_json: bool) -> None:
    """Diagnose common problems; exits 1 when any check fails."""
    host = (ctx.find_root().obj or {}).get("host")
    checks = run_checks(host, config_path, deep=deep)
    failed = sum(1 for c in checks if c.outcome == "fail")
    if as_json:
        click.echo(json.dumps({"healthy": failed == 0, "problems": failed,
                               "checks": [c.as_json() for c in checks]}, indent=2, ensure_ascii=False))
    else:
        out = console()
        for line in report_lines(checks, verbose=verbose):
            out.print(line)
    if failed:
        ctx.exit(1)
