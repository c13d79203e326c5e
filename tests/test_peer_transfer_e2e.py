"""Chunk transfer between real nodes: two ``omx start`` processes serve, a receiving process fetches.

The serving nodes A and C run as in production (Serf, Hypercorn on the API port, the
transfer listener with ``sendfile`` on its own port) with 64 KiB chunks; their models
are created through the API from generated GGUFs of a few dozen chunks. The receiver
is a separate process running the real transport and transfer driver
(``tests/support/peer_fetch_child.py``), so it can be killed with ``-9`` and started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omx.storage import BlobStore
from omx.storage.partial import read_partial_state
from tests.support.cluster import Cluster, ClusterNode, start_cluster
from tests.support.node import create_model, wait_until
from tests.support.transfer import sha256_of, write_big_gguf

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass
class Swarm:
    cluster: Cluster
    models: dict[str, Blob]

    @property
    def a(self) -> ClusterNode:
        return self.cluster[0]

    @property
    def c(self) -> ClusterNode:
        return self.cluster[1]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("transfer")
    cluster = start_cluster(root / "nodes", 2, env={"OMX_MODELS__CHUNK_SIZE": str(CHUNK)})
    try:
        models: dict[str, Blob] = {}
        for label, size, seed, holders in (("plain", 3 << 20, 1, "ac"), ("rot", 2 << 20, 2, "ac"),
                                           ("kill", 4 << 20, 3, "a")):
            gguf = write_big_gguf(root / f"{label}.gguf", size, seed=seed)
            for node in (n for n, key in zip(cluster.nodes, "ac", strict=True) if key in holders):
                with node.client() as client:
                    create_model(client, f"transfer-{label}", gguf)
            models[label] = Blob(sha256_of(gguf), gguf.stat().st_size)
        yield Swarm(cluster, models)
    finally:
        cluster.close()


def transfer_address(node: ClusterNode) -> str:
    port = node.info["transfer_port"]
    assert isinstance(port, int) and port > 0
    return f"{node.host}:{port}"


def api_address(node: ClusterNode) -> str:
    return f"{node.host}:8080"


def served(node: ClusterNode) -> float:
    text = httpx.get(node.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "omx_replication_bytes_served_total":
                return float(sample.value)
    raise AssertionError("omx_replication_bytes_served_total is missing from /metrics")


def settled_served(node: ClusterNode) -> float:
    """The served-bytes counter once it stops moving (a response may finish just after its client left)."""
    readings: list[float] = []

    def steady() -> bool:
        readings.append(served(node))
        return len(readings) >= 2 and readings[-1] == readings[-2]

    wait_until(steady, timeout=20, interval=0.3, what=f"{node.label}'s served bytes to settle")
    return readings[-1]


def child_command(root: Path, blob: Blob, peers: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "tests.support.peer_fetch_child", str(root), blob.digest, str(blob.size),
            *(f"{k}={v}" for k, v in peers.items())]


def child_env(swarm: Swarm, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMX_CLUSTER_SECRET": swarm.cluster.secret_hex, "PYTHONPATH": str(ROOT), **extra}


def fetch(swarm: Swarm, root: Path, blob: Blob, peers: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(child_command(root, blob, peers), env=child_env(swarm), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_blob_from_one_node_over_its_transfer_listener(swarm: Swarm, tmp_path: Path) -> None:
    blob, a = swarm.models["plain"], swarm.a
    before = served(a)
    result = fetch(swarm, tmp_path / "b", blob, {a.node_id: transfer_address(a)})
    assert result["sha256"] == blob.digest
    assert result["received"] == {a.node_id: blob.size} and result["rejected"] == 0
    metrics = result["metrics"]
    assert metrics["omx_replication_bytes_received_total{source=peer}"] == blob.size
    assert metrics["omx_replication_bytes_received_total{source=registry}"] == 0
    assert metrics["omx_replication_chunks_rejected_total"] == 0
    assert metrics["omx_replication_transfers_active"] == 0
    assert settled_served(a) - before == blob.size


def test_a_swarm_of_two_nodes_shares_the_work(swarm: Swarm, tmp_path: Path) -> None:
    """A over its transfer listener, C over its API port (Hypercorn's path): the same bytes either way."""
    blob, a, c = swarm.models["plain"], swarm.a, swarm.c
    before_a, before_c = served(a), served(c)
    result = fetch(swarm, tmp_path / "b", blob, {a.node_id: transfer_address(a), c.node_id: api_address(c)})
    assert result["sha256"] == blob.digest
    got = result["received"]
    assert got[a.node_id] > 0 and got[c.node_id] > 0 and got[a.node_id] + got[c.node_id] == blob.size
    assert settled_served(a) - before_a == got[a.node_id]
    assert settled_served(c) - before_c == got[c.node_id]


def test_a_node_serving_a_rotten_chunk_is_caught_and_another_delivers_it(swarm: Swarm, tmp_path: Path) -> None:
    blob = swarm.models["rot"]
    # The planner gives chunk 0 first to the source whose id sorts first: rot exactly that copy.
    first, other = sorted((swarm.a, swarm.c), key=lambda n: n.node_id)
    path = BlobStore(first.home / "data" / "models").path(blob.digest)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = fetch(swarm, tmp_path / "b", blob, {first.node_id: transfer_address(first),
                                                 other.node_id: transfer_address(other)})
    assert result["sha256"] == blob.digest
    assert result["rejected"] == 1 and result["metrics"]["omx_replication_chunks_rejected_total"] == 1
    assert result["received"][other.node_id] >= CHUNK  # chunk 0 came from the other node


def test_a_receiver_killed_mid_transfer_resumes_without_fetching_what_it_held(swarm: Swarm, tmp_path: Path) -> None:
    blob, a = swarm.models["kill"], swarm.a
    root = tmp_path / "b"
    peers = {a.node_id: transfer_address(a)}
    slow = child_env(swarm, OMX_REPLICATION__MAX_BANDWIDTH=str(256 * 1024))
    proc = subprocess.Popen(child_command(root, blob, peers), env=slow, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def held_chunks() -> int:
        if not (root / "partial").is_dir():
            return 0
        state = read_partial_state(BlobStore(root, chunk_size=CHUNK), blob.digest)
        return len(state.held()) if state is not None else 0

    try:
        wait_until(lambda: held_chunks() >= 8 or proc.poll() is not None, timeout=60, interval=0.05,
                   what="the receiver to hold some chunks")
        assert proc.poll() is None, "the receiver finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()  # type: ignore[union-attr]
    state = read_partial_state(BlobStore(root, chunk_size=CHUNK), blob.digest)
    assert state is not None
    held_bytes = sum(min(CHUNK, blob.size - i * CHUNK) for i in state.held())
    assert 0 < held_bytes < blob.size
    before = settled_served(a)
    result = fetch(swarm, root, blob, peers)
    assert result["sha256"] == blob.digest
    assert result["received"] == {a.node_id: blob.size - held_bytes}
    assert settled_served(a) - before == blob.size - held_bytes
