"""Real multi-node clusters for end-to-end tests.

Each node is an ``omx start`` process with its own home, its own loopback
address (127.0.0.N with the default ports 8080/8081/4001, so nodes never race for
ports) and its own Serf agent on the ``local`` profile. Addresses are taken
under a lock file, so test processes running side by side never share one.

Fixture: ``cluster3`` (session scope) — three nodes A, B, C in one cluster:
A created the secret, B joined by address (``--join`` with
``OMX_CLUSTER_SECRET``), C by token (``--token`` from A's
``GET /api/cluster/token``). Import it into a test module with
``from tests.support.cluster import cluster3  # noqa: F401``. ``cluster3`` is
shared by the whole session, so tests must leave it as they found it: no
member joins, leaves or dies (Serf keeps left and failed members in its list,
which other tests would see) and no models are added. Stand-alone extra nodes
(:meth:`Cluster.new_node` / ``add_node(how="alone")``) are fine. Tests that
change membership build their own cluster with :func:`start_cluster` in a
module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.node import NodeProcess, start_node, wait_until
from tests.support.serf import require_serf, serf_pids

__all__ = ["API_PORT", "P2P_PORT", "WEB_PORT", "Cluster", "ClusterNode", "HostLease", "cluster3", "lease_host",
           "start_cluster"]

API_PORT = 8080
WEB_PORT = 8081
P2P_PORT = 4001
MEMBER_DEADLINE_S = 40.0
_LOCK_DIR = Path(tempfile.gettempdir()) / "omx-test-hosts"
NODE_ENV = {"OMX_P2P__PROFILE": "local", "OMX_ENGINE__NUM_CTX": "256", "OMX_REPLICATION__FACTOR": "1",
            "OMX_REPLICATION__MAX_FACTOR": "1"}
"""Test clusters keep one copy per model and add none for demand unless a test asks for more (so models stay
where tests put them)."""


@dataclass
class HostLease:
    """A loopback address held (by an flock) for the lifetime of a test node."""

    host: str
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = -1


def _ports_free(host: str) -> bool:
    checks = ((socket.SOCK_STREAM, API_PORT), (socket.SOCK_STREAM, WEB_PORT), (socket.SOCK_STREAM, P2P_PORT),
              (socket.SOCK_DGRAM, P2P_PORT))
    for kind, port in checks:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def lease_host(first: int = 11, last: int = 250) -> HostLease:
    """Take a free 127.0.0.N (ports 8080 and 8081 tcp, 4001 tcp+udp free) and hold it until released."""
    _LOCK_DIR.mkdir(exist_ok=True)
    start = first + (os.getpid() % (last - first + 1))
    for i in range(last - first + 1):
        host = f"127.0.0.{first + (start - first + i) % (last - first + 1)}"
        fd = os.open(_LOCK_DIR / f"{host}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _ports_free(host):
            return HostLease(host, fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    raise RuntimeError("no free 127.0.0.N address for a test node")


@dataclass
class ClusterNode:
    """One node of a test cluster. ``proc`` is ``None`` once stopped or killed."""

    label: str
    home: Path
    lease: HostLease
    proc: NodeProcess | None = None
    node_id: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.lease.host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{API_PORT}"

    @property
    def web_url(self) -> str:
        """The dashboard (``web.port``)."""
        return f"http://{self.host}:{WEB_PORT}"

    @property
    def p2p(self) -> str:
        """The gossip address (``host:4001``), what ``--join`` takes."""
        return f"{self.host}:{P2P_PORT}"

    @property
    def secret_path(self) -> Path:
        return self.home / "cluster" / "secret"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60.0), **kw)

    def get(self, path: str, **kw: Any) -> Any:
        """GET ``path`` and return its JSON (asserting a 200)."""
        r = httpx.get(self.url + path, timeout=kw.pop("timeout", 10.0), **kw)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``/api/distributed/nodes`` keyed by node id."""
        return {n["id"]: n for n in self.get("/api/distributed/nodes")["nodes"]}

    def statuses(self) -> dict[str, str]:
        return {k: v["status"] for k, v in self.nodes().items()}

    def serf_pid(self) -> int | None:
        info = json.loads((self.home / "run" / "node.json").read_text())
        return info.get("serf_pid")

    def start(self, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> ClusterNode:
        self.proc = start_node(self.home, host=self.host, port=API_PORT, args=args, env={**NODE_ENV, **(env or {})})
        self.info = self.proc.info
        self.node_id = self.info["node_id"]
        return self

    def stop(self) -> None:
        """Graceful stop (SIGTERM): the node leaves the cluster."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill9(self) -> None:
        """``kill -9`` the node's process group and its Serf agent (no leave is sent)."""
        if self.proc is None:
            return
        agent = self.serf_pid()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.proc.pid, signal.SIGKILL)
        if agent:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent, signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None
        self.lease.release()


@dataclass
class Cluster:
    """Nodes of one test cluster; ``nodes[0]`` created the secret."""

    root: Path
    nodes: list[ClusterNode] = field(default_factory=list)
    extra: list[ClusterNode] = field(default_factory=list)

    def __getitem__(self, index: int) -> ClusterNode:
        return self.nodes[index]

    @property
    def secret_hex(self) -> str:
        return self.nodes[0].secret_path.read_bytes().hex()

    def token(self) -> str:
        """A join token from node A (``GET /api/cluster/token``)."""
        return str(self.nodes[0].get("/api/cluster/token")["token"])

    def new_node(self, label: str) -> ClusterNode:
        """A node object with a fresh home and address, not started (closed at teardown)."""
        node = ClusterNode(label, self.root / label, lease_host())
        self.extra.append(node)
        return node

    def add_node(self, label: str, *, how: str = "token", env: dict[str, str] | None = None) -> ClusterNode:
        """Start one more node joined ``how`` = ``token`` | ``address`` | ``alone``."""
        node = self.new_node(label)
        if how == "token":
            return node.start(("--token", self.token()), env)
        if how == "address":
            return node.start(("--join", self.nodes[0].p2p), {"OMX_CLUSTER_SECRET": self.secret_hex, **(env or {})})
        return node.start((), env)

    def wait_status(self, observers: list[ClusterNode], node_id: str, status: str,
                    timeout: float = MEMBER_DEADLINE_S) -> float:
        """Poll until every observer reports ``node_id`` with ``status``; returns the seconds it took."""
        started = time.monotonic()
        for obs in observers:
            wait_until(lambda o=obs: o.statuses().get(node_id) == status, timeout=timeout, interval=0.1,
                       what=f"{obs.label} to see {node_id} {status}")
        return time.monotonic() - started

    def wait_alive(self, observers: list[ClusterNode] | None = None, expected: list[ClusterNode] | None = None,
                   timeout: float = MEMBER_DEADLINE_S) -> float:
        """Poll until every observer sees every expected node alive."""
        started = time.monotonic()
        observers = observers or self.nodes
        ids = {n.node_id for n in (expected or self.nodes)}

        def ok(obs: ClusterNode) -> bool:
            statuses = obs.statuses()
            return all(statuses.get(i) == "alive" for i in ids)

        for obs in observers:
            wait_until(lambda o=obs: ok(o), timeout=timeout, interval=0.1, what=f"{obs.label} to see all alive")
        return time.monotonic() - started

    def close(self) -> None:
        """Stop every node gracefully, all at once (each leaves while the others do), then release them."""
        nodes = [*self.extra, *self.nodes]
        running = [n.proc.proc for n in nodes if n.proc is not None and n.proc.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30.0
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for node in nodes:
            node.close()  # kills what did not stop in time
        leftover = serf_pids(str(self.root))
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftover, f"serf agents survived their nodes: {leftover}"


def start_cluster(root: Path, size: int = 3, env: dict[str, str] | None = None) -> Cluster:
    """Start ``size`` nodes: A alone, B by address (``--join``), the rest by token (``--token``).

    ``env`` is added to every node's environment (e.g. ``OMX_MODELS__CHUNK_SIZE``).
    """
    require_serf()
    cluster = Cluster(root)
    extra = dict(env or {})
    try:
        labels = "ABCDEFGH"
        for i in range(size):
            node = ClusterNode(labels[i], root / labels[i], lease_host())
            cluster.nodes.append(node)
            if i == 0:
                node.start((), extra)
            elif i == 1:
                node.start(("--join", cluster.nodes[0].p2p), {"OMX_CLUSTER_SECRET": cluster.secret_hex, **extra})
            else:
                node.start(("--token", cluster.token()), extra)
        cluster.wait_alive()
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three running nodes in one cluster (see the module docstring)."""
    cluster = start_cluster(tmp_path_factory.mktemp("cluster3"), 3)
    try:
        yield cluster
    finally:
        cluster.close()


def metric(host: ClusterNode, name: str, /, **labels: str) -> float:
    """The value of one sample of ``host``'s ``/metrics`` (0 when the series does not exist yet)."""
    text = httpx.get(host.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
