"""Hypercorn configuration and listeners, built in one place.

Sockets are bound here, before Hypercorn starts, so the node knows its real
ports (``port: 0`` picks a free one) and a port already taken fails fast with
a clear message. Beside the API's TCP listener (Hypercorn) runs the transfer
listener (:class:`~omx.runtime.peer.server.PeerServer`: the peer endpoints with
``sendfile``). HTTP/3 over QUIC runs in the API's Hypercorn server on a UDP
socket bound here too (:func:`bind_udp`), with the node's TLS files; the TCP
side stays plain HTTP/1.1 and its answers carry ``Alt-Svc`` pointing at it. The QUIC side is
qh3's, under Hypercorn's HTTP layer (:mod:`omx.runtime.quic_server`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from omx.errors import ConfigError
from omx.runtime import quic_server
from omx.runtime.http3 import enlarge_buffers
from omx.runtime.peer.server import PeerServer
from omx.runtime.tls import TlsFiles

__all__ = ["H3Listener", "Listener", "bind_tcp", "bind_udp", "serve_app", "serve_transfers"]

log = logging.getLogger("omx.runtime.server")


@dataclass(frozen=True)
class Listener:
    sock: socket.socket
    host: str
    port: int

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def bind_tcp(host: str, port: int, *, what: str = "API", key: str = "api.port") -> Listener:
    """Bind and listen on ``host:port``; raise ConfigError if it is taken."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, host = infos[0][0], str(infos[0][4][0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{what} port {port} on {host} is already in use", key=key) from exc
        raise ConfigError(f"cannot bind {what} to {host}:{port}: {exc.strerror}", key="api.host") from exc
    sock.listen(1024)
    sock.set_inheritable(True)
    return Listener(sock=sock, host=host, port=sock.getsockname()[1])


def bind_udp(host: str, port: int, *, what: str = "HTTP/3", key: str = "api.h3_port") -> Listener:
    """Bind a UDP socket on ``host:port`` (QUIC); raise ConfigError if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{what} UDP port {port} on {host} is already in use", key=key) from exc
        raise ConfigError(f"cannot bind {what} to {host}:{port}/udp: {exc.strerror}", key=key) from exc
    enlarge_buffers(sock)
    sock.set_inheritable(True)
    return Listener(sock=sock, host=host, port=sock.getsockname()[1])


@dataclass(frozen=True)
class H3Listener:
    """The QUIC socket and the TLS files HTTP/3 is served with."""

    listener: Listener
    tls: TlsFiles

    @property
    def alt_svc(self) -> str:
        return f'h3=":{self.listener.port}"; ma=86400'


def hypercorn_config(listener: Listener, h3: H3Listener | None = None) -> Config:
    config = Config()
    # Hypercorn takes ownership of (and closes) the descriptor it is given:
    # hand it a duplicate so the listener's own socket stays ours to close.
    tcp = [f"fd://{os.dup(listener.sock.fileno())}"]
    if h3 is None:
        config.bind = tcp
    else:
        # With TLS files set Hypercorn puts TLS on ``bind``: the TCP listener goes in
        # ``insecure_bind`` so Ollama clients keep plain HTTP/1.1, QUIC in ``quic_bind``.
        config.bind = []
        config.insecure_bind = tcp
        config.quic_bind = [f"fd://{os.dup(h3.listener.sock.fileno())}"]
        config.certfile, config.keyfile = str(h3.tls.cert), str(h3.tls.key)
        config.alt_svc_headers = [h3.alt_svc]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 65
    config.graceful_timeout = 3
    config.h11_max_incomplete_size = 64 * 1024
    return config


async def serve_app(app: Any, listener: Listener, shutdown: Callable[[], Awaitable[Any]],
                    h3: H3Listener | None = None) -> None:
    """Serve ``app`` on ``listener`` (and HTTP/3 on ``h3`` when given) until ``shutdown`` returns."""
    if h3 is not None:
        quic_server.install()
    await serve(app, hypercorn_config(listener, h3), shutdown_trigger=shutdown, mode="asgi")


async def serve_transfers(app: Any, listener: Listener, shutdown: Callable[[], Awaitable[Any]]) -> None:
    """Serve the peer endpoints of ``app`` on the transfer ``listener`` (``sendfile`` for chunk ranges)."""
    await PeerServer(app).serve(listener.sock, shutdown)
