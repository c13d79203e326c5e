"""Addresses a node advertises: never a wildcard, always an IP literal."""

from __future__ import annotations

import ipaddress
import socket

import psutil

from omx.errors import ConfigError

__all__ = ["advertise_ip", "join_host_port", "resolve_ip"]


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_ip(host: str, key: str) -> str:
    """``host`` as an IP literal (names are resolved once, at start)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc}", key=key) from exc
    return str(infos[0][4][0])


def _first_non_loopback(version: int) -> str | None:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family != family:
                continue
            ip = ipaddress.ip_address(addr.address.split("%", 1)[0])
            if not ip.is_loopback and not ip.is_link_local:
                return str(ip)
    return None


def advertise_ip(bind: str, advertise: str | None, key: str) -> str:
    """The address peers should use: ``advertise``, else ``bind`` unless it is a wildcard,
    else the first non-loopback address of the machine (loopback as a last resort)."""
    if advertise:
        ip = resolve_ip(advertise, key)
        if ipaddress.ip_address(ip).is_unspecified:
            raise ConfigError(f"{key} must be a reachable address, not {advertise!r}", key=key)
        return ip
    bound = ipaddress.ip_address(resolve_ip(bind, key))
    if not bound.is_unspecified:
        return str(bound)
    return _first_non_loopback(bound.version) or ("127.0.0.1" if bound.version == 4 else "::1")
