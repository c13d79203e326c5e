"""Serf tags: the tiny facts a node gossips, bounded by construction.

Serf (protocol >= 3) encodes a member's tags as one magic byte followed by a
msgpack map, and memberlist refuses metadata over 512 bytes. :func:`encode_tags`
computes that exact size (with the old msgpack string forms Serf's encoder
uses, which are never shorter) so oversize tags fail here, before the agent
starts. :class:`NodeTags` bounds every field so that even the longest values
fit: see :data:`NODE_TAGS_WORST_CASE`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack

from omx.errors import ConfigError
from omx.mesh.errors import TagsTooLarge

__all__ = [
    "MAX_NODE_NAME",
    "NODE_TAGS_WORST_CASE",
    "SERF_META_LIMIT",
    "NodeTags",
    "check_node_name",
    "encode_tags",
    "split_host_port",
]

SERF_META_LIMIT = 512
"""memberlist's ``MetaMaxSize``: the most bytes a member's encoded tags may take."""

MAX_NODE_NAME = 128
"""Longest node name accepted (newer Serf releases enforce the same bound)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9 _.-]{0,63}$")
_FUNCTIONS_RE = re.compile(r"^[0-9a-f]{0,16}$")


def encode_tags(tags: Mapping[str, str]) -> bytes:
    """Return Serf's wire encoding of ``tags``; raise :class:`TagsTooLarge` past 512 bytes."""
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"serf tags must map str to str, got {key!r}: {value!r}", key="tags")
    # use_bin_type=False keeps msgpack from using str8, as Serf's Go encoder does.
    encoded: bytes = b"\xff" + msgpack.packb(dict(tags), use_bin_type=False)
    if len(encoded) > SERF_META_LIMIT:
        raise TagsTooLarge(
            f"serf tags take {len(encoded)} bytes encoded, over the {SERF_META_LIMIT}-byte limit", key="tags")
    return encoded


def check_node_name(name: str) -> str:
    """Validate a Serf node name (letters, digits, ``_.-``, at most 128 characters)."""
    if not name or len(name) > MAX_NODE_NAME or not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid node name {name!r}: 1-{MAX_NODE_NAME} characters of letters, digits, '_', '.', '-'",
            key="node_name")
    return name


def split_host_port(addr: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` / bare host; the host must be an IP literal or DNS name."""
    host, sep, port_text = addr.rpartition(":")
    if addr.startswith("["):
        if "]" not in addr:
            raise ConfigError(f"invalid address {addr!r}: unterminated '['")
        host, _, rest = addr[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"invalid address {addr!r}")
        port_text = rest[1:] if rest else ""
        sep = ":" if rest else ""
        if not _is_ip(host) or ":" not in host:
            raise ConfigError(f"invalid IPv6 address in {addr!r}")
    elif not sep or host.count(":"):
        # No port, or a bare IPv6 literal.
        host, port_text, sep = addr, "", ""
    if not sep:
        if default_port is None:
            raise ConfigError(f"address {addr!r} needs a port")
        port = default_port
    else:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"invalid port in address {addr!r}")
        port = int(port_text)
    if not host or len(host) > 253 or not (_is_ip(host) or re.match(r"^[A-Za-z0-9.-]+$", host)):
        raise ConfigError(f"invalid host in address {addr!r}")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class NodeTags:
    """What an omx node gossips about itself.

    ``api`` is the HTTP API address (``ip:port``; never a wildcard), ``h3_port``
    the HTTP/3 UDP port if enabled, ``transfer_port`` the transfer listener's TCP
    port, ``inventory`` a short version string that changes whenever the node's
    inventory does, ``functions`` a short digest of its function table (empty:
    none published), ``label`` an optional human name. Every field is bounded so the encoded tags always fit.
    """

    api: str
    h3_port: int | None = None
    inventory: str = "0"
    label: str = ""
    transfer_port: int | None = None
    """TCP port of the transfer listener (peer chunk endpoints with sendfile), on the API's host."""
    functions: str = ""
    """Digest of the function table (up to 16 hex digits): peers pull the table only when it changed."""

    def __post_init__(self) -> None:
        host, port = split_host_port(self.api)
        if not _is_ip(host):
            raise ConfigError(f"api address {self.api!r} must be an IP literal", key="api.advertise")
        if ipaddress.ip_address(host).is_unspecified:
            raise ConfigError(f"api address {self.api!r} is a wildcard; advertise a reachable address",
                              key="api.advertise")
        # Normalise (compressed IPv6, no zone ids) so the length bound holds.
        object.__setattr__(self, "api", _join_host_port(str(ipaddress.ip_address(host)), port))
        if self.h3_port is not None and not 0 < self.h3_port < 65536:
            raise ConfigError(f"invalid HTTP/3 port {self.h3_port}", key="api.h3_port")
        if self.transfer_port is not None and not 0 < self.transfer_port < 65536:
            raise ConfigError(f"invalid transfer port {self.transfer_port}", key="p2p.transfer_port")
        if not _VERSION_RE.match(self.inventory):
            raise ConfigError(f"invalid inventory version {self.inventory!r}")
        if not _FUNCTIONS_RE.match(self.functions):
            raise ConfigError(f"invalid function table digest {self.functions!r}")
        if not _LABEL_RE.match(self.label):
            raise ConfigError(f"invalid node label {self.label!r}: up to 63 of letters, digits, ' _.-'",
                              key="node.name")

    def to_tags(self) -> dict[str, str]:
        """The Serf tag map (checked against the 512-byte limit)."""
        tags = {"omx": "1", "api": self.api, "inv": self.inventory}
        if self.h3_port is not None:
            tags["h3"] = str(self.h3_port)
        if self.transfer_port is not None:
            tags["xf"] = str(self.transfer_port)
        if self.label:
            tags["label"] = self.label
        if self.functions:
            tags["fn"] = self.functions
        encode_tags(tags)
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> NodeTags | None:
        """Parse a peer's tags; ``None`` when they are not (valid) omx tags."""
        if tags.get("omx") != "1" or "api" not in tags:
            return None
        try:
            h3, xf = tags.get("h3"), tags.get("xf")
            return cls(api=tags["api"], h3_port=int(h3) if h3 else None,
                       inventory=tags.get("inv", "0"), label=tags.get("label", ""),
                       transfer_port=int(xf) if xf else None, functions=tags.get("fn", ""))
        except (ConfigError, ValueError):
            return None


NODE_TAGS_WORST_CASE = len(encode_tags(NodeTags(
    api="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", h3_port=65535, inventory="v" * 64, label="L" * 63,
    transfer_port=65535, functions="f" * 16,
).to_tags()))
"""Encoded size of the largest possible :class:`NodeTags` (well under 512)."""
