"""An HTTP API server over a real socket serving the model and registry handlers of one store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omx.functions.builtin import models, pull
from omx.functions.call import NodeInfo, Services
from omx.functions.dispatch import Dispatcher
from omx.functions.registry import FunctionRegistry
from omx.runtime.app import build_app
from omx.runtime.registry_http import HttpxRegistryTransport
from omx.runtime.server import bind_tcp, serve_app
from omx.storage import ModelStore
from omx.types import NodeId
from tests.support.registry_fixtures import CHUNK

__all__ = ["ApiNode", "api_node"]


@dataclass
class ApiNode:
    url: str
    store: ModelStore


@contextlib.asynccontextmanager
async def api_node(root: Path, registry: str, **client_options: Any) -> AsyncIterator[ApiNode]:
    store = ModelStore(root, chunk_size=CHUNK)
    transport = HttpxRegistryTransport()
    options: dict[str, Any] = {"backoff": 0.01, "max_backoff": 0.05, **client_options}
    client = pull.make_registry_client(store, transport, default_registry=registry, insecure=True, **options)
    handlers = FunctionRegistry()
    models.register(handlers)
    pull.register(handlers)
    services = Services(store=store, scheduler=None,  # type: ignore[arg-type] - no model is loaded here
                        node=NodeInfo(node_id=NodeId("omx-test0001"), version="0"),
                        registry=client)
    app = build_app(handlers, services, Dispatcher())
    listener = bind_tcp("127.0.0.1", 0)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_app(app, listener, stop.wait))
    try:
        yield ApiNode(listener.url, store)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        listener.sock.close()
        await transport.aclose()
