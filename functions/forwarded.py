"""The effective client address of a request behind trusted reverse proxies (pure).

A node trusts ``X-Forwarded-For`` only when the direct peer is one of its
``security.trusted_proxies``. It then walks the header's hops from the right
(the hop appended by the nearest proxy) and takes the first address that is
not itself a trusted proxy: hops further left were written by the client and
prove nothing. Without trusted proxies the direct peer is the client, so a
reverse proxy on the same machine would make every client look like loopback;
list it in ``trusted_proxies``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPNetwork", "client_address", "is_loopback", "parse_networks"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["10.0.0.1", "fd00::/8"]`` -> networks; a bad entry raises :class:`ValueError` naming it."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from exc
    return tuple(networks)


def _address(text: str | None) -> _IPAddress | None:
    """An IP address from a peer host or a forwarded hop (``1.2.3.4:80``, ``[::1]:80``, ``fe80::1%eth0``)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: _IPAddress | None, proxies: Sequence[IPNetwork]) -> bool:
    return address is not None and any(address.version == net.version and address in net for net in proxies)


def client_address(direct: str | None, forwarded_for: Sequence[str], proxies: Sequence[IPNetwork]) -> str | None:
    """The client a request acts for.

    ``direct`` is the connected peer's host, ``forwarded_for`` the values of
    every ``X-Forwarded-For`` header in order. An unparsable hop is returned as
    written (it is never loopback, so it grants nothing).
    """
    if not proxies or not _trusted(_address(direct), proxies):
        return direct
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if not _trusted(address, proxies):
            return str(address) if address is not None else hop
    return str(_address(hops[0])) if hops else direct


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (and ``localhost``, as some servers report it)."""
    address = _address(host)
    if address is None:
        return host == "localhost"
    return address.is_loopback
