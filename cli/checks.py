"""The checks behind ``omx troubleshoot``: each returns a :class:`Check` with a one-line fix.

Pure deciders (``disk_verdict``, ``memory_verdict``, ``port_verdict``) take measured
numbers; the thin probes around them read the machine (psutil, sockets, ``serf
version``, the node's HTTP API and the store on disk).
"""

from __future__ import annotations

import errno
import os
import random
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from omx.cli.format import human_bytes

__all__ = [
    "MIN_FREE_DISK",
    "MIN_FREE_DISK_FRACTION",
    "MIN_FREE_MEMORY",
    "SAMPLE_FULL_LIMIT",
    "Check",
    "PortUse",
    "disk_verdict",
    "memory_verdict",
    "port_owner",
    "port_verdict",
    "serf_binary",
    "verify_blob_sample",
]

MIN_FREE_DISK = 2**30
MIN_FREE_DISK_FRACTION = 0.05
MIN_FREE_MEMORY = 512 * 2**20
# Blobs up to this size are verified chunk by chunk in the quick store check;
# bigger ones (model weights) get their first, last and one random chunk checked.
SAMPLE_FULL_LIMIT = 64 * 2**20

_WILDCARDS = ("0.0.0.0", "::", "")

Outcome = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    """One line of the report: ``Checking <label>... <icon>`` plus detail and fix."""

    key: str
    label: str
    outcome: Outcome
    detail: str | None = None
    fix: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def serf_binary() -> str:
    """The Serf executable to use: ``$OMX_SERF_BINARY`` (a name or a path), else ``serf``."""
    return os.environ.get("OMX_SERF_BINARY") or "serf"


# ------------------------------------------------------------------ resources


def disk_verdict(free: int, total: int, max_cache: int, store_used: int) -> tuple[Outcome, str]:
    """Fail under 1 GiB or 5 % free; warn when the cache limit cannot be reached."""
    text = f"{human_bytes(free)} free of {human_bytes(total)}"
    if free < MIN_FREE_DISK or (total > 0 and free < total * MIN_FREE_DISK_FRACTION):
        return "fail", text
    if store_used + free < max_cache:
        return "warn", f"{text}; models.max_cache_size ({human_bytes(max_cache)}) cannot fit"
    return "ok", text


def memory_verdict(available: int, total: int) -> tuple[Outcome, str]:
    """Fail when less than 512 MiB is available (not even a small model fits)."""
    text = f"{human_bytes(available)} available of {human_bytes(total)}"
    return ("fail" if available < MIN_FREE_MEMORY else "ok"), text


# ------------------------------------------------------------------ ports


@dataclass(frozen=True)
class PortUse:
    """Who holds a port: ``pid`` None when the owner cannot be seen (another user)."""

    pid: int | None
    name: str | None


def port_owner(port: int, host: str = "0.0.0.0") -> PortUse | None:
    """The process listening on (or bound to) ``host:port``, as far as psutil can tell."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        laddr = conn.laddr
        if not laddr or laddr.port != port:
            continue
        if host not in _WILDCARDS and laddr.ip not in (host, *_WILDCARDS):
            continue  # another address on the same port (tests give each node its own 127.0.0.N)
        if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
            continue
        name = None
        if conn.pid is not None:
            try:
                name = psutil.Process(conn.pid).name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                name = None
        return PortUse(conn.pid, name)
    return None


def port_bindable(host: str, port: int) -> bool:
    """Whether a TCP listener could bind ``host:port`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def our_pids(node_pid: int | None) -> set[int]:
    """The node's pid and its descendants (its Serf agent, its runners)."""
    import psutil

    if node_pid is None:
        return set()
    try:
        proc = psutil.Process(node_pid)
        return {node_pid, *(child.pid for child in proc.children(recursive=True))}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return set()


def port_verdict(role: str, port: int, free: bool, owner: PortUse | None, ours: set[int]) -> str | None:
    """None when the port is usable by this node, else what holds it."""
    if free or (owner is not None and owner.pid in ours):
        return None
    if owner is None or owner.pid is None:
        return f"port {port} ({role}) is in use by another program"
    return f"port {port} ({role}) is in use by {owner.name or 'a process'} (pid {owner.pid})"


# ------------------------------------------------------------------ peers


def unreachable_peers(nodes: list[dict[str, Any]], timeout: float) -> list[str]:
    """Alive peers whose API does not answer ``/health`` within ``timeout``."""
    bad = []
    for node in nodes:
        if node.get("self") or node.get("status") != "alive":
            continue
        address = str(node.get("address") or "")
        try:
            response = httpx.get(f"http://{address}/health", timeout=timeout)
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        if not ok:
            bad.append(f"{node.get('id')} ({address})")
    return bad


# ------------------------------------------------------------------ store


def verify_blob_sample(path: Path, index: Any, *, full_limit: int = SAMPLE_FULL_LIMIT,
                       rng: random.Random | None = None) -> int | None:
    """Check blob chunks against its BLAKE3 chunk index; returns the first bad chunk or None.

    Blobs up to ``full_limit`` bytes are checked whole; larger ones at their first,
    last and one random chunk, which keeps the quick check fast on multi-GB weights
    (``troubleshoot --deep`` re-hashes everything).
    """
    from omx.storage import verify_chunk

    count = index.chunk_count
    if count == 0:
        return None
    if index.size <= full_limit:
        picks = list(range(count))
    else:
        picks = sorted({0, count - 1, (rng or random.Random()).randrange(count)})
    with open(path, "rb") as handle:
        for i in picks:
            offset, length = index.chunk_range(i)
            handle.seek(offset)
            if not verify_chunk(handle.read(length), index.chunks[i]):
                return i
    return None
