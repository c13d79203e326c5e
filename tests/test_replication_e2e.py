"""Replication between three real nodes (real Serf, real sockets, generated GGUFs of a few dozen chunks).

The tests run in order on one cluster with ``replication.factor`` 2 and 64 KiB chunks:
a model created on A reaches exactly one other node; factor 3 fills the third; factor 2
drops the replication-added copy and never A's; a migration moves a copy and a
rebalance leaves it there; ``pull`` on a node that lacks the model takes it from
peers with no registry reachable; ``kill -9`` of a holder makes the survivors restore
the factor by themselves; a byte flipped on disk is found by verify and repaired from
a peer; bad input to every endpoint gets a 4xx ``{"error"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from omx.storage import BlobStore
from omx.storage.partial import read_partial_state
from omx.types import BlobDigest
from tests.support.cluster import Cluster, ClusterNode, metric, start_cluster
from tests.support.node import create_model, start_node, wait_until
from tests.support.transfer import sha256_of, write_big_gguf

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

OMX = Path(sys.executable).with_name("omx")
CHUNK = 64 * 1024
MODEL = "rep-model:latest"
DEADLINE = 60.0
ENV = {"OMX_MODELS__CHUNK_SIZE": str(CHUNK), "OMX_REPLICATION__FACTOR": "2",
       "OMX_MODELS__REGISTRY": "127.0.0.1:9"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replication")
    c = start_cluster(root / "nodes", 3, env=ENV)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_big_gguf(tmp_path_factory.mktemp("rep-gguf") / "rep.gguf", 2 << 20, seed=11)


def holders(node: ClusterNode, model: str = MODEL) -> dict[str, Any]:
    rows = {m["name"]: m for m in node.get("/api/distributed/models")["models"]}
    return rows.get(model, {})


def local_models(node: ClusterNode) -> set[str]:
    """The models ``node`` holds itself (``/api/tags`` also lists those held elsewhere, without it in held_by)."""
    return {m["name"] for m in node.get("/api/tags")["models"] if node.node_id in m["held_by"]}


def blob_path(node: ClusterNode, digest: str) -> Path:
    return node.home / "data" / "models" / "blobs" / digest.replace(":", "-")



def post(node: ClusterNode, path: str, body: Any) -> httpx.Response:
    return httpx.post(node.url + path, json=body, timeout=60)


def wait_holders(cluster: Cluster, expected: set[str], model: str = MODEL) -> None:
    """Every alive node reports exactly ``expected`` holders, and each of them has the model locally."""
    alive = [n for n in cluster.nodes if n.proc is not None]

    def settled() -> bool:
        for node in alive:
            row = holders(node, model)
            if set(row.get("nodes", [])) != expected:
                return False
        by_id = {n.node_id: n for n in alive}
        return all((model in local_models(by_id[i])) == (i in expected) for i in by_id)

    wait_until(settled, timeout=DEADLINE, interval=0.25, what=f"holders of {model} to be {sorted(expected)}")


def test_created_model_reaches_exactly_one_more_node(cluster: Cluster, gguf: Path) -> None:
    a = cluster[0]
    with a.client() as client:
        create_model(client, MODEL, gguf)
    wait_until(lambda: holders(a).get("replicas") == 2 and holders(a)["status"] == "ready", timeout=DEADLINE,
               interval=0.25, what="the model to have 2 replicas")
    row = holders(a)
    assert a.node_id in row["nodes"] and row["factor"] == 2
    other = next(n for n in cluster.nodes if n.node_id in row["nodes"] and n is not a)
    third = next(n for n in cluster.nodes if n.node_id not in row["nodes"])
    wait_holders(cluster, set(row["nodes"]))
    digest = sha256_of(gguf)
    assert sha256_of(blob_path(other, digest)) == digest
    assert MODEL not in local_models(third)
    assert metric(other, "omx_replication_bytes_received_total", source="peer") > 0
    assert metric(a, "omx_replication_bytes_served_total") > 0


def test_factor_up_fills_the_third_and_down_drops_the_replica_not_the_original(cluster: Cluster) -> None:
    a = cluster[0]
    r = post(a, "/api/distributed/replicate", {"model": MODEL, "factor": 3})
    assert r.status_code == 200, r.text
    assert r.json()["factor"] == 3
    wait_holders(cluster, {n.node_id for n in cluster.nodes})
    status = a.get("/api/distributed/replication/status")
    assert status["replication_health"] == "healthy" and status["total_models"] >= 1

    r = post(cluster[1], "/api/distributed/replicate", {"model": MODEL, "factor": 2})
    assert r.status_code == 200, r.text
    wait_until(lambda: len(holders(a).get("nodes", [])) == 2, timeout=DEADLINE, interval=0.25,
               what="the factor to shrink to 2")
    row = holders(a)
    assert a.node_id in row["nodes"], "the user's copy on A must never be dropped"
    wait_holders(cluster, set(row["nodes"]))


def test_migrate_moves_the_copy_and_rebalance_leaves_it(cluster: Cluster) -> None:
    a = cluster[0]
    row = holders(a)
    target = next(n for n in cluster.nodes if n.node_id not in row["nodes"])
    keeper = next(i for i in row["nodes"] if i != a.node_id)
    # The target is named by a unique prefix of its id, as the CLI allows.
    r = post(a, "/api/distributed/migrate", {"model_name": MODEL, "from_node": a.node_id,
                                             "to_node": target.node_id[:10]})
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["message"] == "Migration initiated" and started["status"] in ("started", "transferring")

    def done() -> dict[str, Any] | None:
        state = a.get(f"/api/distributed/migrate/{started['migration_id']}")
        assert state["status"] != "failed", state
        return state if state["status"] == "completed" else None

    final = wait_until(done, timeout=DEADLINE, interval=0.25, what="the migration to complete")
    assert final["progress"] == 1.0
    wait_holders(cluster, {target.node_id, keeper})

    r = post(a, "/api/distributed/rebalance", {})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Rebalance initiated" and body["status"] == "started" and body["rebalance_id"]
    assert not [s for s in body["plan"] if s["model"] == MODEL], body["plan"]
    wait_holders(cluster, {target.node_id, keeper})


def test_pull_takes_the_model_from_peers_without_a_registry(cluster: Cluster) -> None:
    lacking = next(n for n in cluster.nodes if MODEL not in local_models(n))
    with lacking.client() as client, client.stream("POST", "/api/pull", json={"model": MODEL}) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1] == {"status": "success"}, lines
    assert any("peers" in str(line.get("status")) for line in lines)
    assert MODEL in local_models(lacking)
    assert metric(lacking, "omx_replication_bytes_received_total", source="registry") == 0
    # Three holders for factor 2: the replication-added copy goes, the two user copies stay.
    a = cluster[0]
    wait_until(lambda: len(holders(a).get("nodes", [])) == 2, timeout=DEADLINE, interval=0.25,
               what="the surplus replica to be dropped")
    assert lacking.node_id in holders(a)["nodes"]


def test_a_killed_holder_is_replaced_without_any_command(cluster: Cluster) -> None:
    a = cluster[0]
    row = holders(a)
    victim = next(n for n in cluster.nodes if n.node_id in row["nodes"] and n is not a) \
        if a.node_id in row["nodes"] else next(n for n in cluster.nodes if n.node_id in row["nodes"])
    survivors = [n for n in cluster.nodes if n is not victim]
    victim.kill9()
    cluster.wait_status(survivors, victim.node_id, "failed")
    wait_holders(cluster, {n.node_id for n in survivors})


def test_verify_finds_and_repairs_a_flipped_byte(cluster: Cluster, gguf: Path) -> None:
    alive = [n for n in cluster.nodes if n.proc is not None]
    node = alive[-1]
    digest = sha256_of(gguf)
    path = blob_path(node, digest)
    data = bytearray(path.read_bytes())
    data[CHUNK * 3 + 17] ^= 0xFF
    path.write_bytes(bytes(data))
    r = post(node, "/api/distributed/verify", {"model": MODEL})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["damaged"] == 1 and report["repaired"] == 1 and report["unrepaired"] == 0, report
    assert report["blobs"][0]["damaged_chunks"] == [3]
    assert hashlib.sha256(blob_path(node, digest).read_bytes()).hexdigest() == digest.split(":")[1]
    clean = post(node, "/api/distributed/verify", {}).json()
    assert clean["damaged"] == 0 and clean["checked_chunks"] > 0


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/api/distributed/replicate", {"model": MODEL, "factor": 0}, 400),
    ("/api/distributed/replicate", {"model": MODEL, "factor": -1}, 400),
    ("/api/distributed/replicate", {"model": MODEL, "factor": 10**9}, 400),
    ("/api/distributed/replicate", {"model": MODEL, "factor": 17}, 400),
    ("/api/distributed/replicate", {"model": MODEL, "factor": "2"}, 400),
    ("/api/distributed/replicate", {"model": "no-such-model", "factor": 2}, 404),
    ("/api/distributed/replicate", {"model": "../../etc", "factor": 2}, 400),
    ("/api/distributed/migrate", {"model_name": "no-such-model", "from_node": "x", "to_node": "y"}, 404),
    ("/api/distributed/migrate", {"model_name": MODEL, "from_node": "omx-nosuch", "to_node": "omx-nosuch2"}, 404),
    ("/api/distributed/migrate", {"model_name": MODEL}, 400),
    ("/api/distributed/verify", {"model": 5}, 400),
    ("/api/distributed/verify", {"model": "no-such-model"}, 404),
])
def test_bad_input_is_refused(cluster: Cluster, path: str, body: Any, status: int) -> None:
    node = cluster[0]
    before = node.get("/api/distributed/models")
    r = post(node, path, body)
    assert r.status_code == status, r.text
    assert isinstance(r.json().get("error"), str)
    assert node.get("/api/distributed/models") == before


def test_migrate_refuses_same_node_and_non_holder(cluster: Cluster) -> None:
    a = cluster[0]
    row = holders(a)
    holder = row["nodes"][0]
    r = post(a, "/api/distributed/migrate", {"model_name": MODEL, "from_node": holder, "to_node": holder})
    assert r.status_code == 400 and "same node" in r.json()["error"]
    alive = {n.node_id for n in cluster.nodes if n.proc is not None}
    lacking = sorted(alive - set(row["nodes"]))
    if lacking:
        r = post(a, "/api/distributed/migrate", {"model_name": MODEL, "from_node": lacking[0], "to_node": holder})
        assert r.status_code == 400 and "does not hold" in r.json()["error"]


def test_malformed_json_is_refused(cluster: Cluster) -> None:
    r = httpx.post(cluster[0].url + "/api/distributed/replicate", content=b"{nope", timeout=10)
    assert r.status_code == 400 and "error" in r.json()


def omx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(OMX), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMX_HOME": "/nonexistent-omx-home"})


def test_cli_commands(cluster: Cluster) -> None:
    a = cluster[0]
    status = omx("--host", a.url, "replication", "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["replication_health"] in ("healthy", "degraded", "critical")
    assert MODEL in {m["name"] for m in doc["models"]}
    table = omx("--host", a.url, "replication", "status")
    assert table.returncode == 0 and MODEL in table.stdout and "Replication health" in table.stdout

    rep = omx("--host", a.url, "replicate", MODEL, "--factor", "2", "--json")
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["factor"] == 2
    bad = omx("--host", a.url, "replicate", MODEL, "--factor", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr

    reb = omx("--host", a.url, "rebalance", "--json")
    assert reb.returncode == 0 and json.loads(reb.stdout)["message"] == "Rebalance initiated"

    ver = omx("--host", a.url, "verify", MODEL)
    assert ver.returncode == 0, ver.stderr
    assert "0 damaged" in ver.stdout

    mig = omx("--host", a.url, "migrate", MODEL, "--from", "omx-nosuch", "--to", a.node_id)
    assert mig.returncode == 1 and "not an alive member" in mig.stderr and "Traceback" not in mig.stderr



def served_total(nodes: list[ClusterNode]) -> float:
    return sum(metric(n, "omx_replication_bytes_served_total") for n in nodes)


def persisted_chunks(node: ClusterNode, digest: str) -> int:
    """Chunks the partial blob's saved bitmap claims (what survives a kill -9)."""
    state = read_partial_state(BlobStore(node.home / "data" / "models", chunk_size=CHUNK), BlobDigest(digest))
    return 0 if state is None else sum(bin(b).count("1") for b in state.have)


def test_a_receiver_killed_mid_transfer_resumes_without_refetching(cluster: Cluster, gguf: Path) -> None:
    sources = [n for n in cluster.nodes if n.proc is not None]
    size, digest = gguf.stat().st_size, sha256_of(gguf)
    slow = {**ENV, "OMX_REPLICATION__MAX_BANDWIDTH": str(512 * 1024)}
    # A new node that receives slowly (512 KiB/s), so it can be killed in the middle of the transfer.
    d = cluster.add_node("D", env=slow)
    cluster.wait_alive(sources + [d], sources + [d])
    r = post(sources[0], "/api/distributed/replicate", {"model": MODEL, "factor": 3})
    assert r.status_code == 200, r.text
    held = wait_until(lambda: persisted_chunks(d, digest) >= 6 or None, timeout=DEADLINE, interval=0.05,
                      what="D to have saved some chunks")
    d.kill9()
    held = persisted_chunks(d, digest)
    total_chunks = -(-size // CHUNK)
    assert 6 <= held < total_chunks
    cluster.wait_status(sources, d.node_id, "failed")
    before = served_total(sources)
    d.start((), slow)  # no --join: it rejoins from its own Serf snapshot
    cluster.wait_alive(sources + [d], sources + [d], timeout=90.0)
    wait_until(lambda: MODEL in local_models(d), timeout=DEADLINE, interval=0.25, what="D to complete the model")
    assert sha256_of(blob_path(d, digest)) == digest
    served = served_total(sources) - before
    # After the restart only the chunks D had not saved were sent again.
    assert served <= size - held * CHUNK + CHUNK, (served, size, held)


def test_verify_exits_1_when_no_peer_can_repair(tmp_path: Path, gguf: Path) -> None:
    """A lone node: the damage is found and reported, the blob is no longer served, and the CLI exits 1."""
    node = start_node(tmp_path / "lone", env={"OMX_MODELS__CHUNK_SIZE": str(CHUNK)})
    try:
        with node.client() as client:
            create_model(client, "lone:latest", gguf)
        digest = sha256_of(gguf)
        path = tmp_path / "lone" / "data" / "models" / "blobs" / digest.replace(":", "-")
        data = bytearray(path.read_bytes())
        data[CHUNK + 5] ^= 0x01
        path.write_bytes(bytes(data))
        result = omx("--host", node.url, "verify", "lone")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "1 damaged, 0 repaired, 1 unrepaired" in result.stdout and "Traceback" not in result.stderr
        assert "NOT repaired" in result.stdout
        assert BlobStore(tmp_path / "lone" / "data" / "models", chunk_size=CHUNK).has(BlobDigest(digest))
        # Marked damaged: the peer endpoints will not serve it.
        assert (tmp_path / "lone" / "data" / "models" / "damaged" / digest.replace(":", "-")).is_file()
    finally:
        node.stop()


def test_delete_removes_a_model_from_every_node_and_no_copy_comes_back(cluster: Cluster, gguf: Path) -> None:
    alive = [n for n in cluster.nodes if n.proc is not None]
    a, name = alive[0], "gone-model:latest"
    with a.client() as client:
        create_model(client, name, gguf)
    wait_until(lambda: holders(a, name).get("replicas") == 2, timeout=DEADLINE, interval=0.25,
               what="the model to have 2 replicas")
    held = set(holders(a, name)["nodes"])
    entry = next((n for n in alive if n.node_id not in held), alive[-1])
    r = httpx.request("DELETE", entry.url + "/api/delete", json={"model": name}, timeout=60)
    assert r.status_code == 200, r.text
    wait_until(lambda: all(name not in {m["name"] for m in n.get("/api/tags")["models"]} for n in alive),
               timeout=DEADLINE, interval=0.25, what="every node to stop listing the deleted model")
    # Two more reconcile rounds everywhere: no node places a copy again.
    rounds = {n.node_id: n.get("/api/distributed/replication/status")["reconciles"] for n in alive}
    assert post(a, "/api/distributed/rebalance", {}).status_code == 200
    wait_until(lambda: all(n.get("/api/distributed/replication/status")["reconciles"] >= rounds[n.node_id] + 2
                           for n in alive), timeout=DEADLINE, interval=0.25, what="two reconcile rounds")
    assert all(name not in local_models(n) for n in alive)
    again = httpx.request("DELETE", a.url + "/api/delete", json={"model": name}, timeout=60)
    assert again.status_code == 404 and "not found" in again.json()["error"]
