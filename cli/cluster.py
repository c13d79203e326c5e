"""``omx cluster init|token|join|leave``: the cluster secret and membership.

With a node running, ``token``, ``join`` and ``leave`` ask it (``/api/cluster/*``).
Without one, ``token`` is built from the local secret and the configured gossip
address, and ``join`` prepares the next ``omx start``: it stores the token's secret
and adds its seeds to ``p2p.join`` in the config file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import yaml

from omx.cli.client import CliFailure, NodeClient, ca_file, config_failure, discover_url, pid_alive, read_node_file
from omx.errors import ConfigError
from omx.fsutil import atomic_write
from omx.runtime.config import Settings, default_config_path, load_settings

__all__ = ["cluster_group", "local_token", "running_node", "set_join_seeds"]

_LOOPBACK = ("127.", "::1", "localhost")


def running_node(ctx: click.Context) -> NodeClient | None:
    """A client for the node to administer: ``--host`` if given, else the local running node."""
    obj = ctx.find_root().obj or {}
    host = obj.get("host")
    http3 = bool(obj.get("http3"))
    ca = ca_file(obj.get("ca")) if http3 else None
    if host:
        return NodeClient(discover_url(host, http3=http3), timeout=60.0, ca=ca)
    info = read_node_file()
    pid = info.get("pid") if info else None
    if info and isinstance(pid, int) and pid_alive(pid) and isinstance(info.get("url"), str):
        return NodeClient(discover_url(None, http3=http3), timeout=60.0, ca=ca)
    return None


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise config_failure(exc) from exc


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_token(settings: Settings) -> tuple[str, str]:
    """``(token, seed)`` from the secret file and the configured gossip address."""
    from omx.mesh import InvalidSecret, JoinToken, read_secret

    try:
        secret = read_secret(settings.secret_path)
    except InvalidSecret as exc:
        raise CliFailure(f"Error: {exc} (create one with 'omx cluster init')") from exc
    host = settings.p2p.advertise or settings.p2p.bind or settings.api.host
    if host in ("0.0.0.0", "::", ""):
        raise CliFailure("Error: the gossip address is a wildcard; set p2p.advertise to the address peers reach",
                         exit_code=2)
    has_port = "]:" in host if host.startswith("[") else host.count(":") == 1
    seed = host if has_port else _join_host_port(host.strip("[]"), settings.p2p.port)
    return JoinToken(seeds=(seed,), secret=secret).encode(), seed


def set_join_seeds(text: str, seeds: list[str]) -> str:
    """``text`` (a config file) with ``p2p.join`` set to ``seeds``, keeping every comment (pure)."""
    flow = "[" + ", ".join(f'"{s}"' for s in seeds) + "]"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^p2p:\s*(#.*)?$", line)), None)
    if start is None:
        result = text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"p2p:\n  join: {flow}\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()
                    and not lines[i].startswith("#")), len(lines))
        key = next((i for i in range(start + 1, end) if re.match(r"^\s+join\s*:", lines[i])), None)
        if key is None:
            lines.insert(start + 1, f"  join: {flow}")
        else:
            indent = lines[key][: len(lines[key]) - len(lines[key].lstrip())]
            stop = key + 1
            while stop < end and re.match(rf"^{indent}\s*-\s", lines[stop]):
                stop += 1  # a block list's items go with the key
            lines[key:stop] = [f"{indent}join: {flow}"]
        result = "\n".join(lines) + "\n"
    try:
        check = yaml.safe_load(result)
    except yaml.YAMLError:
        check = None
    if not isinstance(check, dict) or (check.get("p2p") or {}).get("join") != seeds:
        # An unusual layout: rewrite the data itself (comments are lost, values kept).
        data = yaml.safe_load(text) or {}
        data.setdefault("p2p", {})["join"] = seeds
        result = yaml.safe_dump(data, sort_keys=False)
    return result


@click.group("cluster")
def cluster_group() -> None:
    """Create, join and leave a cluster; print its CA certificate."""


@cluster_group.command("init")
@click.option("--force", is_flag=True, help="Replace an existing secret (every node must then rejoin).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file.")
def init_cmd(force: bool, config_path: Path | None) -> None:
    """Create the cluster secret that keys gossip and peer requests."""
    from omx.mesh import ClusterSecret, InvalidSecret, load_or_create_secret, write_secret

    path = _settings(config_path).secret_path
    try:
        if path.exists() and force:
            write_secret(path, ClusterSecret.generate(), overwrite=True)
            created = True
        elif path.exists():
            raise CliFailure(f"Error: a cluster secret already exists at {path} (use --force to replace it)")
        else:
            _secret, created = load_or_create_secret(path)
    except InvalidSecret as exc:
        raise CliFailure(f"Error: {exc}") from exc
    except OSError as exc:
        raise CliFailure(f"Error: cannot write {path}: {exc.strerror}") from exc
    click.echo(f"✅ {'Created' if created else 'Kept'} cluster secret at {path}")
    click.echo("Share the cluster with 'omx cluster token' (the token contains the secret: keep it private).")


@cluster_group.command("token")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file.")
@click.pass_context
def token_cmd(ctx: click.Context, config_path: Path | None) -> None:
    """Print a join token for this cluster (it contains the cluster secret)."""
    client = running_node(ctx)
    if client is not None:
        with client:
            answer = client.get("/api/cluster/token")
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise CliFailure("Error: the node answered without a token")
        click.echo(token)
        return
    token, seed = local_token(_settings(config_path))
    if seed.startswith(_LOOPBACK):
        click.echo(f"Warning: the seed {seed} is a loopback address; only this machine can join through it "
                   "(set p2p.advertise)", err=True)
    click.echo(token)


@cluster_group.command("ca")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file.")
@click.pass_context
def ca_cmd(ctx: click.Context, config_path: Path | None) -> None:
    """Print the cluster CA certificate (PEM) that HTTP/3 clients trust.

    Every member derives the same CA from the cluster secret. The running node is
    asked (GET /api/cluster/ca); without one, it is derived from the local secret.
    """
    client = running_node(ctx)
    if client is not None:
        with client:
            click.echo(client.request("GET", "/api/cluster/ca").text, nl=False)
        return
    from cryptography.hazmat.primitives import serialization

    from omx.mesh import InvalidSecret, read_secret
    from omx.runtime.tls import cluster_ca

    try:
        secret = read_secret(_settings(config_path).secret_path)
    except InvalidSecret as exc:
        raise CliFailure(f"Error: {exc} (create one with 'omx cluster init')") from exc
    click.echo(cluster_ca(secret)[1].public_bytes(serialization.Encoding.PEM).decode(), nl=False)


def _join_offline(token_text: str, config_path: Path | None, force: bool) -> tuple[list[str], Path]:
    from omx.mesh import InvalidJoinToken, InvalidSecret, JoinToken, read_secret, write_secret

    try:
        token = JoinToken.parse(token_text)
    except InvalidJoinToken as exc:
        raise CliFailure(f"Error: {exc}", exit_code=2) from exc
    settings = _settings(config_path)
    secret_path = settings.secret_path
    if secret_path.exists():
        try:
            current = read_secret(secret_path)
        except InvalidSecret as exc:
            raise CliFailure(f"Error: {exc}") from exc
        if current != token.secret and not force:
            raise CliFailure(f"Error: {secret_path} holds another cluster's secret; use --force to replace it")
    if not secret_path.exists() or read_secret(secret_path) != token.secret:
        write_secret(secret_path, token.secret, overwrite=True)
    path = config_path or default_config_path()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    seeds = list(dict.fromkeys([*settings.p2p.join, *token.seeds]))
    atomic_write(path, set_join_seeds(text, seeds), mode=0o600)  # a config may hold API keys
    _settings(path)  # the file must still load
    return list(token.seeds), path


@cluster_group.command("join")
@click.argument("token")
@click.option("--force", is_flag=True, help="Replace a different cluster secret (when no node runs).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Config file.")
@click.pass_context
def join_cmd(ctx: click.Context, token: str, force: bool, config_path: Path | None) -> None:
    """Join the cluster a token describes (now if a node runs, else at the next 'omx start')."""
    client = running_node(ctx)
    if client is not None:
        with client:
            answer: Any = client.post("/api/cluster/join", {"token": token})
        joined = answer.get("joined") if isinstance(answer, dict) else None
        click.echo(f"✅ Joined the cluster{f' ({joined} nodes contacted)' if isinstance(joined, int) else ''}")
        return
    seeds, path = _join_offline(token, config_path, force)
    click.echo(f"✅ Stored the cluster secret and added {', '.join(seeds)} to p2p.join in {path}")
    click.echo("The node joins the cluster at its next 'omx start'.")


@cluster_group.command("leave")
@click.pass_context
def leave_cmd(ctx: click.Context) -> None:
    """Leave the cluster gracefully (the node keeps serving on its own)."""
    client = running_node(ctx)
    if client is None:
        raise CliFailure("omx: no node is running (start one with 'omx start')")
    with client:
        client.request("POST", "/api/cluster/leave")
    click.echo("✅ Left the cluster; the node now runs on its own.")
