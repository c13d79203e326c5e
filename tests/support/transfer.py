"""In-process peers for the transfer tests: a store served by the real adapter and transfer listener.

:class:`PeerHarness` is one "peer": a :class:`ModelStore` in its own folder,
the real peer handlers behind the real adapter (HMAC auth included) and the
real :class:`PeerServer` on a 127.0.0.1 socket. Several harnesses in one event
loop make a small swarm without starting node processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from omx.functions.builtin import peer_blobs
from omx.functions.call import NodeInfo, Services
from omx.functions.dispatch import Dispatcher, peer_verifier
from omx.functions.registry import FunctionRegistry
from omx.mesh import Verifier
from omx.runtime.app import build_app
from omx.runtime.peer import HttpPeerTransport
from omx.runtime.peer.server import PeerServer
from omx.storage import ModelStore
from omx.types import NodeId

__all__ = ["KEY", "PeerHarness", "ServedCounter", "peer_harness", "sha256_of", "transport_for", "write_big_gguf"]

KEY = b"k" * 32


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_big_gguf(path: Path, size: int, *, seed: int = 0) -> Path:
    """A valid GGUF of about ``size`` bytes: a tiny vocabulary and one large random F32 tensor."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("transfer test model")
    w.add_context_length(256)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", *[f"t{i}" for i in range(29)]]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([1] * len(tokens))
    w.add_tensor("blob.weight", rng.standard_normal(max(1, size // 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class ServedCounter:
    """The :class:`~omx.functions.cluster_view.ServedBytes` sink of a harness."""

    total: int = 0
    responses: int = 0

    def bytes_served(self, n: int) -> None:
        self.total += n
        self.responses += 1


@dataclass
class PeerHarness:
    node_id: str
    store: ModelStore
    app: Any
    address: str = ""
    served: ServedCounter = field(default_factory=ServedCounter)


@contextlib.asynccontextmanager
async def peer_harness(root: Path, node_id: str, *, chunk_size: int = 64 * 1024) -> AsyncIterator[PeerHarness]:
    """Serve ``root``'s store as peer ``node_id`` on 127.0.0.1 until the context exits."""
    store = ModelStore(root, chunk_size=chunk_size)
    registry = FunctionRegistry()
    peer_blobs.register(registry)
    served = ServedCounter()
    services = Services(store=store, scheduler=None, node=NodeInfo(NodeId(node_id), "test"))  # type: ignore[arg-type]
    services.transfer_stats = served
    dispatcher = Dispatcher(peer_verifier=peer_verifier(Verifier(KEY, window_s=300)))
    app = build_app(registry, services, dispatcher)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    stop = asyncio.Event()
    server = asyncio.create_task(PeerServer(app).serve(sock, stop.wait))
    harness = PeerHarness(node_id, store, app, f"127.0.0.1:{sock.getsockname()[1]}", served)
    try:
        yield harness
    finally:
        stop.set()
        await server
        sock.close()


def transport_for(peers: list[PeerHarness], *, node_id: str = "omx-receiver", timeout: float = 10.0
                  ) -> HttpPeerTransport:
    """A real transport that reaches each harness by its node id."""
    addresses = {p.node_id: p.address for p in peers}
    return HttpPeerTransport(node_id, lambda: KEY, addresses.get, timeout=timeout)
