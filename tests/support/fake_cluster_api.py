"""A FAKE cluster API for CLI formatting tests: canned JSON and a real WebSocket event feed.

One ``websockets`` server answers plain HTTP GETs (``/health``,
``/api/distributed/*``, ``/api/cluster/token``) from mutable dicts and upgrades
``/api/distributed/events`` to a WebSocket; :meth:`FakeClusterApi.push` sends an
event to every connected client. Tests of the real node use the real runtime.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

__all__ = ["FakeClusterApi", "node_entry", "sample_state"]

EVENTS_PATH = "/api/distributed/events"


def node_entry(ident: str, status: str = "alive", *, address: str = "127.0.0.1:8080", me: bool = False,
               models: list[str] | None = None, resources: dict[str, float] | None = None) -> dict[str, Any]:
    """One member as ``/api/distributed/nodes`` lists it."""
    return {"id": ident, "name": None, "status": status, "address": address, "p2p_address": "127.0.0.1:4001",
            "models": models or [], "inventory_version": "1",
            "resources": resources if resources is not None else {"cpu": 0.152, "memory": 0.25, "disk": 0.2},
            "self": me, "last_change": "2026-01-01T00:00:00Z"}


def sample_state() -> dict[str, Any]:
    """A healthy two-node cluster seen from ``omx-aaaa1111`` (which holds two models)."""
    return {
        "/health": {
            "status": "healthy", "timestamp": "2026-01-02T03:04:05Z", "version": "0.1.0",
            "node_id": "omx-aaaa1111", "node_name": None, "uptime": 125.0, "membership": "serf",
            "services": {"api": True, "p2p": True, "p2p_peers": 1, "scheduler": True, "available_nodes": 2,
                         "consensus": False, "consensus_leader": False},
        },
        "/api/distributed/status": {
            "distributed_mode": True, "fallback_mode": False, "cluster_size": 2,
            "active_nodes": ["omx-aaaa1111", "omx-bbbb2222"],
            "scheduler_stats": {"loaded_models": 1}, "runner_stats": {"backend": "llama_cpp", "runners": []},
            "routing": {"held": 2, "queue_timeout": 30.0, "requests": [
                {"model": "phi3:mini", "node": "omx-aaaa1111", "requests": 40},
                {"model": "phi3:mini", "node": "omx-bbbb2222", "requests": 5}]},
            "integration_stats": {"serf_version": "0.8.2-dev", "agent_restarts": 0,
                                  "gossip_address": "127.0.0.1:4001", "web": None},
            "node": {
                "id": "omx-aaaa1111", "name": None, "role": "peer", "uptime": 125.0,
                "started_at": "2026-01-02T03:02:00Z",
                "resources": {"cpu": 0.152, "memory": 0.25, "disk": 0.2, "cpu_count": 8,
                              "memory_used": 2 * 10**9, "memory_total": 8 * 10**9,
                              "disk_used": 20 * 10**9, "disk_total": 100 * 10**9},
                "services": {"api": "http://127.0.0.1:8080", "web": None, "p2p": "127.0.0.1:4001"},
                "connections": 3,
                "models": [{"name": "phi3:mini", "size": 2 * 10**9, "loaded": True, "requests": 45},
                           {"name": "llama2:7b", "size": 7 * 10**9, "loaded": False, "requests": 23}],
            },
        },
        "/api/distributed/nodes": {"nodes": [
            node_entry("omx-aaaa1111", me=True, models=["phi3:mini", "llama2:7b"]),
            node_entry("omx-bbbb2222", address="127.0.0.2:8080", models=["phi3:mini"]),
        ]},
        "/api/distributed/metrics": {"timestamp": "2026-01-02T03:04:05Z", "node_id": "omx-aaaa1111",
                                     "connected_peers": 1, "is_leader": False, "requests_processed": 68,
                                     "models_loaded": 1, "nodes_total": 2, "nodes_online": 2, "uptime": 125.0,
                                     "websocket_connections": 0},
    }


@dataclass
class FakeClusterApi:
    """Serve ``state`` (path -> JSON) over HTTP; ``events=False`` answers the event path with 404."""

    state: dict[str, Any] = field(default_factory=sample_state)
    events: bool = True
    hits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: set[ServerConnection] = set()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeClusterApi:
        self._server = serve(self._handler, "127.0.0.1", 0, process_request=self._process_request,
                             compression=None)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=20)

    def update(self, path: str, value: Any) -> None:
        with self._lock:
            self.state[path] = value

    def snapshot(self, path: str) -> Any:
        with self._lock:
            return copy.deepcopy(self.state[path])

    def subscribers(self) -> int:
        with self._lock:
            return len(self._clients)

    def push(self, event: dict[str, Any]) -> None:
        """Send ``event`` to every open event stream."""
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            try:
                conn.send(json.dumps(event))
            except ConnectionClosed:
                pass

    def _process_request(self, _conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        with self._lock:
            self.hits.append(path)
            body = copy.deepcopy(self.state.get(path))
        if path == EVENTS_PATH and self.events:
            return None  # go on with the WebSocket handshake
        if body is None:
            return _json_response(HTTPStatus.NOT_FOUND, {"error": "404 page not found"})
        return _json_response(HTTPStatus.OK, body)

    def _handler(self, conn: ServerConnection) -> None:
        with self._lock:
            self._clients.add(conn)
            nodes = copy.deepcopy(self.state["/api/distributed/nodes"]["nodes"])
        try:
            conn.send(json.dumps({"type": "snapshot", "nodes": nodes, "timestamp": "2026-01-02T03:04:05Z"}))
            for _message in conn:
                pass  # the CLI never sends; wait for it to close
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._clients.discard(conn)


def _json_response(status: HTTPStatus, body: Any) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)
