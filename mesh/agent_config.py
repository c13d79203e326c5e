"""Configuration of a node's Serf agent, and the helpers that launch it.

The agent is configured through a JSON ``-config-file`` written with mode
0600: it carries ``rpc_auth`` and ``encrypt_key``, argv is world-readable and
this Serf has no ``-rpc-auth`` flag.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from omx.errors import ConfigError
from omx.fsutil import atomic_write
from omx.mesh.tags import check_node_name, encode_tags, split_host_port
from omx.processes import child_env

__all__ = ["DEFAULT_GOSSIP_PORT", "AgentConfig", "AgentState", "serf_available"]

log = logging.getLogger(__name__)

DEFAULT_GOSSIP_PORT = 4001


def serf_available(binary: str = "serf") -> tuple[bool, str | None]:
    """Whether the Serf binary can run here, and its version (e.g. ``0.8.2-dev``).

    Runs ``serf version`` (a few milliseconds); call it at startup or in a thread.
    """
    path = shutil.which(binary)
    if path is None:
        return False, None
    try:
        out = subprocess.run([path, "version"], capture_output=True, text=True, timeout=10, check=False,
                             env=child_env())
    except (OSError, subprocess.SubprocessError):
        return False, None
    match = re.search(r"(\d+\.\d+\.\d+[\w.-]*)", out.stdout)
    return (out.returncode == 0, match.group(1) if match else None)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, repr=False)
class AgentConfig:
    """How to run one node's Serf agent.

    ``bind``/``port``: gossip address (TCP+UDP). ``advertise``: the address
    peers should use, when ``bind`` is a wildcard. ``rpc_port``: loopback RPC
    port, ``None`` to pick a free one. ``join``: seeds (``host:port``) joined
    at start and retried every ``join_retry_s`` until one answers.
    """

    node_name: str
    bind: str = "127.0.0.1"
    port: int = DEFAULT_GOSSIP_PORT
    advertise: str | None = None
    rpc_port: int | None = None
    profile: Literal["lan", "local", "wan"] = "lan"
    tags: Mapping[str, str] = field(default_factory=dict)
    encrypt_key: str | None = None
    rpc_auth: str | None = None
    join: tuple[str, ...] = ()
    join_retry_s: float = 5.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        check_node_name(self.node_name)
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))
        encode_tags(self.tags)
        for addr in (self.bind, *([self.advertise] if self.advertise else [])):
            try:
                ipaddress.ip_address(addr)
            except ValueError as exc:
                raise ConfigError(f"gossip address {addr!r} must be an IP literal", key="p2p.bind") from exc
        if not 0 < self.port < 65536:
            raise ConfigError(f"invalid gossip port {self.port}", key="p2p.port")
        if self.rpc_port is not None and not 0 < self.rpc_port < 65536:
            raise ConfigError(f"invalid serf RPC port {self.rpc_port}", key="p2p.rpc_port")
        if self.profile not in ("lan", "local", "wan"):
            raise ConfigError(f"serf profile must be lan, local or wan, not {self.profile!r}",
                              key="p2p.profile")
        if self.encrypt_key is not None:
            try:
                size = len(base64.b64decode(self.encrypt_key, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise ConfigError("serf encrypt key is not base64", key="cluster.secret") from exc
            if size not in (16, 24, 32):
                raise ConfigError("serf encrypt key must decode to 16, 24 or 32 bytes", key="cluster.secret")
        object.__setattr__(self, "join", tuple(self.join))
        for seed in self.join:
            split_host_port(seed, self.port)

    def __repr__(self) -> str:
        return (f"AgentConfig(node_name={self.node_name!r}, bind={self.bind!r}, port={self.port}, "
                f"profile={self.profile!r}, encrypted={self.encrypt_key is not None}, join={self.join!r})")

    def serf_json(self, rpc_port: int, rpc_auth: str, tags: Mapping[str, str],
                  snapshot: Path) -> dict[str, object]:
        """The agent's JSON configuration."""
        conf: dict[str, object] = {
            "node_name": self.node_name,
            "bind": _join_host_port(self.bind, self.port),
            "rpc_addr": f"127.0.0.1:{rpc_port}",
            "rpc_auth": rpc_auth,
            "profile": self.profile,
            "tags": dict(tags),
            "log_level": self.log_level,
            "snapshot_path": str(snapshot),
            # Leaving is decided by the supervisor over RPC, never by a signal.
            "leave_on_terminate": False,
            "skip_leave_on_interrupt": True,
        }
        if self.advertise:
            conf["advertise"] = self.advertise
        if self.encrypt_key:
            conf["encrypt_key"] = self.encrypt_key
        return conf


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_private_json(path: Path, data: Mapping[str, object]) -> None:
    """Write JSON atomically, created with mode 0600 (it carries the RPC token and gossip key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(data, indent=2), mode=0o600)


AgentState = Literal["stopped", "starting", "running", "restarting", "leaving", "left", "failed"]
