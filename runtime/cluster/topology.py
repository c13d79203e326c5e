"""Where this node listens and what it advertises (computed once at start)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from omx.errors import ConfigError
from omx.mesh import NodeTags
from omx.runtime.cluster.addresses import advertise_ip, join_host_port, resolve_ip
from omx.runtime.cluster.records import node_label
from omx.runtime.config import Settings

__all__ = ["Topology", "topology"]


@dataclass(frozen=True)
class Topology:
    """The API's advertised address, the gossip bind and advertised addresses, and the node label."""

    api_address: str
    p2p_bind: str
    p2p_port: int
    p2p_advertise: str
    label: str
    transfer_port: int | None = None
    h3_port: int | None = None

    @property
    def p2p_address(self) -> str:
        return join_host_port(self.p2p_advertise, self.p2p_port)

    def tags(self, inventory_version: str, functions_version: str = "") -> dict[str, str]:
        """Serf tags (bounded by :class:`NodeTags`)."""
        return NodeTags(api=self.api_address, inventory=inventory_version, label=self.label,
                        transfer_port=self.transfer_port, h3_port=self.h3_port,
                        functions=functions_version).to_tags()


def _free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (gossip uses both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise ConfigError(f"no free gossip port on {host}", key="p2p.port")


def topology(settings: Settings, api_host: str, api_port: int, transfer_port: int | None = None,
             h3_port: int | None = None) -> Topology:
    """Compute the node's addresses (blocking: may resolve names and list interfaces)."""
    api_ip = advertise_ip(api_host, settings.api.advertise, "api.advertise")
    p2p_bind = resolve_ip(settings.p2p.bind or api_host, "p2p.bind")
    p2p_advertise = advertise_ip(p2p_bind, settings.p2p.advertise, "p2p.advertise")
    port = settings.p2p.port or _free_port(p2p_bind)
    return Topology(api_address=join_host_port(api_ip, api_port), p2p_bind=p2p_bind, p2p_port=port,
                    p2p_advertise=p2p_advertise, label=node_label(settings.node.name), transfer_port=transfer_port,
                    h3_port=h3_port)
