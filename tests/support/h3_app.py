"""An ASGI app served in-process over HTTP/3 (omx's QUIC server) with an omx peer client to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omx.mesh import ClusterSecret
from omx.runtime.peer.h3 import H3PeerClient
from omx.runtime.server import H3Listener, bind_tcp, bind_udp, serve_app
from omx.runtime.tls import ensure_tls


@dataclass
class ServedH3:
    client: H3PeerClient
    address: str
    """``host:port`` of the HTTP/3 listener."""
    stop: asyncio.Event
    """Set to stop the server (it also stops when the block ends)."""


@asynccontextmanager
async def served_over_h3(app: Any, tls_dir: Path, name: str) -> AsyncIterator[ServedH3]:
    """Serve ``app`` on 127.0.0.1 (TLS material for ``name`` under ``tls_dir``, a fresh cluster CA)."""
    tls = ensure_tls(tls_dir, ClusterSecret.generate(), name, ["127.0.0.1"])
    tcp, udp = bind_tcp("127.0.0.1", 0), bind_udp("127.0.0.1", 0)
    stop = asyncio.Event()
    server = asyncio.create_task(serve_app(app, tcp, stop.wait, H3Listener(udp, tls)))
    client = H3PeerClient(tls.ca_cert, connect_timeout=5)
    try:
        yield ServedH3(client, f"127.0.0.1:{udp.port}", stop)
    finally:
        await client.aclose()
        stop.set()
        await asyncio.wait_for(server, 10)
        tcp.sock.close()
        udp.sock.close()
