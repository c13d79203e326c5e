"""Where a node's cluster secret comes from.

Precedence: a join token (``cluster.token`` / ``--token``) > ``OMX_CLUSTER_SECRET``
> the secret file (``cluster.secret_file``, default ``$OMX_HOME/cluster/secret``).
A node that is not joining anyone creates the secret file on its first start
(a lone node is a one-node cluster); a node told to join (``p2p.join``)
without any secret fails with :class:`ConfigError` (``omx start`` exits 2).
A token's secret, and one from ``OMX_CLUSTER_SECRET``, is written to the secret
file, so the node keeps its cluster across restarts without the token or the
variable (a restart without it used to come back as a one-node cluster).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omx.errors import ConfigError
from omx.mesh import ClusterSecret, InvalidJoinToken, InvalidSecret, JoinToken, read_secret, write_secret

__all__ = ["SECRET_ENV", "SecretResolution", "SecretSource", "persist_secret", "resolve_secret"]

SECRET_ENV = "OMX_CLUSTER_SECRET"
SecretSource = Literal["token", "env", "file", "created"]


@dataclass(frozen=True)
class SecretResolution:
    """The secret, where it came from, and the seeds a token adds to ``p2p.join``."""

    secret: ClusterSecret
    source: SecretSource
    seeds: tuple[str, ...] = ()


def resolve_secret(token: str | None, secret_path: Path, joining: bool,
                   env: Mapping[str, str]) -> SecretResolution:
    """Resolve the secret (see the module docstring); raises :class:`ConfigError` with the fix."""
    if token:
        try:
            parsed = JoinToken.parse(token)
        except InvalidJoinToken as exc:
            raise ConfigError(f"invalid join token: {exc.message}", key="cluster.token") from exc
        persist_secret(secret_path, parsed.secret)
        return SecretResolution(parsed.secret, "token", parsed.seeds)
    text = env.get(SECRET_ENV, "").strip()
    if text:
        try:
            secret = ClusterSecret.from_text(text)
        except InvalidSecret as exc:
            raise ConfigError(f"{SECRET_ENV}: {exc.message}", key="cluster.secret") from exc
        persist_secret(secret_path, secret)
        return SecretResolution(secret, "env")
    if secret_path.exists():
        try:
            return SecretResolution(read_secret(secret_path), "file")
        except InvalidSecret as exc:
            raise ConfigError(exc.message, key="cluster.secret_file") from exc
    if joining:
        raise ConfigError(
            "joining a cluster needs its secret: pass --token TOKEN (from `omx cluster token` on a member), "
            f"set {SECRET_ENV}, or copy the secret file to {secret_path}", key="cluster.secret_file")
    secret = ClusterSecret.generate()
    try:
        write_secret(secret_path, secret)
    except InvalidSecret:  # another process created it first
        return SecretResolution(read_secret(secret_path), "file")
    except OSError as exc:
        raise ConfigError(f"cannot create the cluster secret {secret_path}: {exc.strerror}",
                          key="cluster.secret_file") from exc
    return SecretResolution(secret, "created")


def persist_secret(path: Path, secret: ClusterSecret) -> None:
    """Write ``secret`` to ``path`` atomically (0600), replacing another cluster's."""
    try:
        if path.exists() and read_secret(path) == secret:
            return
    except InvalidSecret:
        pass
    try:
        write_secret(path, secret, overwrite=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the cluster secret {path}: {exc.strerror}",
                          key="cluster.secret_file") from exc
