"""Replication faults on real nodes (real Serf, real sockets, generated GGUFs of 64 KiB chunks).

**A full disk.** Node B keeps its model store on a 3 MiB tmpfs (mounted here; root
needed) and receives at 256 KiB/s, so the test can fill the disk while a transfer
runs. A pull of a model larger than the free space is refused before anything is
written; a disk that fills during a pull or a replication fails the transfer with
an error that says so, gives the space back (no partial file stays), and leaves
the store intact: the models already there are listed, their blobs hash right,
fsck and verify find nothing. Placement passes over a node whose disk is full
(no transfer starts while reconcile rounds go by), and the replica arrives once
space is freed.

**The last copy.** Under ``models.max_cache_size`` pressure with
``models.auto_cleanup`` on, a user's copy is never evicted, nor is a replica that
is the only copy on an alive node, however many reconcile rounds run; a replica
beyond the cache limit is evicted as soon as another node holds the model.
Reconcile rounds are counted by ``reconciles`` in
``GET /api/distributed/replication/status``; the tests wait for rounds that
started after the state they check, never for time to pass.

**Retries back off.** Should placement keep picking a node whose fetches fail,
reconcile starts the fetch again only after ``retry_s``, doubled for every failure
in a row (a unit test on a replicator with an in-memory cluster and a fake clock).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from omx.errors import PeerError
from omx.runtime.peer.transfers import Transfers
from omx.runtime.replication.link import PeerCommands
from omx.runtime.replication.operations import ReplicationService
from omx.runtime.replication.replicator import ReplicationSettings, Replicator
from omx.storage import ModelStore
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.placement import ClusterSnapshot, plan, rank
from omx.types import BlobDigest, NodeId
from tests.support.cluster import Cluster, ClusterNode, metric, start_cluster
from tests.support.disk import fill, mount_tmpfs, unmount
from tests.support.node import create_model, wait_until
from tests.support.placement import cluster as placement_cluster
from tests.support.placement import holdings
from tests.support.placement import model as placement_model
from tests.support.transfer import sha256_of, write_big_gguf

CHUNK = 64 * 1024
DISK = 3 << 20
RATE = 256 * 1024
DEADLINE = 60.0
ENV = {"OMX_MODELS__CHUNK_SIZE": str(CHUNK), "OMX_MODELS__REGISTRY": "127.0.0.1:9"}
KEEP, BIG, MID, REP = "keep-me:latest", "too-big:latest", "mid:latest", "rep:latest"
LAST = "last-copy:latest"
TINY_CACHE = str(64 * 1024)


# ------------------------------------------------------------------ helpers


def stop_quickly(cluster: Cluster) -> None:
    """Tear down without the graceful leave (seconds per node): ``kill -9`` every node and its Serf agent."""
    for node in [*cluster.nodes, *cluster.extra]:
        node.kill9()
    cluster.close()


def post(node: ClusterNode, path: str, body: Any) -> httpx.Response:
    return httpx.post(node.url + path, json=body, timeout=60)


def store_of(node: ClusterNode) -> Path:
    """A node's store at its default place (under its home)."""
    return node.home / "data" / "models"


def held(store: Path) -> set[str]:
    """The models a store holds, read from its disk (``/api/tags`` also lists the peers' models)."""
    return {e.name for e in ModelStore(store, chunk_size=CHUNK).list_models_sync()}


def row(node: ClusterNode, model: str) -> dict[str, Any]:
    rows = {m["name"]: m for m in node.get("/api/distributed/models")["models"]}
    return rows.get(model, {})


def status(node: ClusterNode) -> dict[str, Any]:
    return dict(node.get("/api/distributed/replication/status"))


def transfer(node: ClusterNode, model: str) -> dict[str, Any] | None:
    return next((t for t in status(node)["transfers"] if t["model"] == model), None)



def received(node: ClusterNode) -> float:
    return metric(node, "omx_replication_bytes_received_total", source="peer")


def run_reconciles(nodes: list[ClusterNode], rounds: int = 3) -> None:
    """Wait until each node finished ``rounds`` reconcile rounds that began after this call (kicking them)."""
    for node in nodes:
        # The round under way when we look may have read the state before it: one more is needed.
        target = status(node)["reconciles"] + rounds + 1

        def done(node: ClusterNode = node, target: int = target) -> bool:
            if status(node)["reconciles"] >= target:
                return True
            post(node, "/api/distributed/rebalance", {})  # a kick: reconcile now, not in 10 s
            return False

        wait_until(done, timeout=DEADLINE, interval=0.3, what=f"{rounds} reconcile rounds on {node.label}")


def pull(node: ClusterNode, model: str) -> list[dict[str, Any]]:
    with node.client() as client, client.stream("POST", "/api/pull", json={"model": model}) as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line]


def assert_no_space_error(message: object) -> None:
    text = str(message).lower()
    assert "space" in text, message
    assert "traceback" not in text and "internal error" not in text, message


def blob_path(store: Path, digest: str) -> Path:
    return store / "blobs" / digest.replace(":", "-")


# ------------------------------------------------------------------ the full disk


class Tight:
    """A cluster of A (normal disk) and B (store on a small tmpfs, slow receiver)."""

    def __init__(self, cluster: Cluster, disk: Path, ggufs: dict[str, Path]) -> None:
        self.cluster = cluster
        self.disk = disk
        self.store = disk / "store"
        self.ggufs = ggufs
        self.a = cluster[0]
        self.b = cluster.extra[0]

    def free_space(self) -> None:
        (self.disk / "filler").unlink(missing_ok=True)

    def assert_store_intact(self, models: tuple[str, ...]) -> None:
        """B lists ``models`` and no other, their blobs hash right, fsck and verify are clean, no partial file."""
        assert held(self.store) == set(models)
        for model in models:
            digest = sha256_of(self.ggufs[model])
            assert sha256_of(blob_path(self.store, digest)) == digest
        assert not list((self.store / "partial").glob("*")), "a partial blob was left on the full disk"
        assert ModelStore(self.store, chunk_size=CHUNK).check_sync(deep=True) == []
        report = post(self.b, "/api/distributed/verify", {}).json()
        assert report["damaged"] == 0 and report["checked_chunks"] > 0, report
        # The node serves other requests.
        assert httpx.get(self.b.url + "/health", timeout=10).status_code == 200
        shown = post(self.b, "/api/show", {"model": KEEP})
        assert shown.status_code == 200, shown.text


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tight]:
    root = tmp_path_factory.mktemp("faults")
    ggufs = {KEEP: write_big_gguf(root / "keep.gguf", 192 << 10, seed=21),
             BIG: write_big_gguf(root / "big.gguf", 4 << 20, seed=22),
             MID: write_big_gguf(root / "mid.gguf", 1 << 20, seed=23),
             REP: write_big_gguf(root / "rep.gguf", 1 << 20, seed=24)}
    disk = root / "disk"
    mount_tmpfs(disk, DISK)
    try:
        cluster = start_cluster(root / "nodes", 1, env=ENV)
        try:
            cluster.add_node("B", env={**ENV, "OMX_MODELS__STORE_PATH": str(disk / "store"),
                                       "OMX_REPLICATION__MAX_BANDWIDTH": str(RATE)})
            cluster.wait_alive([cluster[0], cluster.extra[0]], [cluster[0], cluster.extra[0]])
            t = Tight(cluster, disk, ggufs)
            with t.b.client() as client:
                create_model(client, KEEP, ggufs[KEEP])
            with t.a.client() as client:
                for model in (BIG, MID, REP):
                    create_model(client, model, ggufs[model])
            for model in (BIG, MID, REP):
                wait_until(lambda m=model: row(t.b, m).get("nodes") == [t.a.node_id], timeout=DEADLINE,
                           interval=0.1, what=f"B to see {model} on A")
            yield t
        finally:
            stop_quickly(cluster)
    finally:
        unmount(disk)


@pytest.mark.serf
@pytest.mark.e2e
def test_a_pull_larger_than_the_free_space_is_refused_before_writing(tight: Tight) -> None:
    lines = pull(tight.b, BIG)
    assert "error" in lines[-1], lines
    assert_no_space_error(lines[-1]["error"])
    assert "not enough disk space" in lines[-1]["error"]
    r = post(tight.b, "/api/pull", {"model": BIG, "stream": False})
    assert r.status_code == 500 and set(r.json()) == {"error"}, r.text
    assert_no_space_error(r.json()["error"])
    tight.assert_store_intact((KEEP,))


@pytest.mark.serf
@pytest.mark.e2e
def test_a_disk_that_fills_during_a_pull_fails_it_clearly_and_gives_the_space_back(tight: Tight) -> None:
    b = tight.b
    with b.client() as client, client.stream("POST", "/api/pull", json={"model": MID}) as response:
        assert response.status_code == 200
        lines: list[dict[str, Any]] = []
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(json.loads(line))
            if (lines[-1].get("completed") or 0) >= 2 * CHUNK and not (tight.disk / "filler").exists():
                fill(tight.disk)  # the transfer has written some chunks: now the disk is full
    assert (tight.disk / "filler").exists(), f"the pull ended before the disk could be filled: {lines}"
    assert "error" in lines[-1], lines
    assert_no_space_error(lines[-1]["error"])
    assert "no space left" in lines[-1]["error"]
    failed = transfer(b, MID)
    assert failed is not None and failed["state"] == "failed", status(b)
    assert_no_space_error(failed["error"])
    tight.assert_store_intact((KEEP,))

    # Space freed, the same pull succeeds.
    tight.free_space()
    assert pull(b, MID)[-1] == {"status": "success"}
    tight.assert_store_intact((KEEP, MID))


@pytest.mark.serf
@pytest.mark.e2e
def test_replication_passes_over_a_full_disk_without_retrying_in_a_loop(tight: Tight) -> None:
    a, b = tight.a, tight.b
    fill(tight.disk)
    r = post(a, "/api/distributed/replicate", {"model": REP, "factor": 2})
    assert r.status_code == 200, r.text
    wait_until(lambda: row(b, REP).get("factor") == 2, timeout=DEADLINE, interval=0.2,
               what="B to know REP's factor")
    before = received(b)
    run_reconciles([b])
    # B has no room: placement does not pick it, and no transfer starts.
    assert row(b, REP)["status"] == "under_replicated" and row(b, REP)["nodes"] == [a.node_id]
    assert received(b) == before and transfer(b, REP) is None
    assert REP not in held(tight.store)

    # Room again: B fetches the replica; the disk fills during the transfer.
    tight.free_space()
    post(a, "/api/distributed/rebalance", {})

    def started() -> bool:
        t = transfer(b, REP)
        return t is not None and t["bytes_done"] >= 2 * CHUNK

    wait_until(started, timeout=DEADLINE, interval=0.02, what="B to start fetching REP")
    fill(tight.disk)
    failed = wait_until(lambda: (t := transfer(b, REP)) is not None and t["state"] == "failed" and t,
                        timeout=DEADLINE, interval=0.1, what="the transfer to fail on the full disk")
    assert failed["bytes_done"] < failed["bytes_total"], failed
    assert_no_space_error(failed["error"])
    assert status(b)["failed_replications"] >= 1
    tight.assert_store_intact((KEEP, MID))

    # No loop: rounds go by, nothing more is fetched, the replica is not there.
    before, served = received(b), metric(a, "omx_replication_bytes_served_total")
    run_reconciles([b])
    assert received(b) == before and metric(a, "omx_replication_bytes_served_total") == served
    assert transfer(b, REP) == failed
    tight.assert_store_intact((KEEP, MID))

    # Space freed: the replica arrives by itself (after the retry delay), complete and verified.
    tight.free_space()

    def replicated() -> bool:
        if REP in held(tight.store):
            return True
        post(a, "/api/distributed/rebalance", {})
        return False

    wait_until(replicated, timeout=DEADLINE, interval=0.5, what="B to hold the replica")
    wait_until(lambda: row(a, REP).get("status") == "ready", timeout=DEADLINE, interval=0.2,
               what="REP to be ready")
    tight.assert_store_intact((KEEP, MID, REP))


# ------------------------------------------------------------------ the last copy


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """P (tiny cache limit, auto_cleanup) and Q (no pressure yet); factor 1."""
    root = tmp_path_factory.mktemp("last-copy")
    cluster = start_cluster(root / "nodes", 1, env={**ENV, "OMX_MODELS__MAX_CACHE_SIZE": TINY_CACHE})
    try:
        cluster.add_node("Q", env=ENV)
        cluster.wait_alive([cluster[0], cluster.extra[0]], [cluster[0], cluster.extra[0]])
        yield cluster
    finally:
        stop_quickly(cluster)


def origin_on(node: ClusterNode, model: str) -> str | None:
    doc = json.loads((store_of(node) / "cluster" / "holdings.json").read_text())
    return next((m["origin"] for m in doc["models"] if m["name"] == model.removesuffix(":latest")
                 or m["name"] == model), None)


@pytest.mark.serf
@pytest.mark.e2e
def test_the_last_copy_survives_every_cleanup(pair: Cluster, tmp_path: Path) -> None:
    p, q = pair[0], pair.extra[0]
    gguf = write_big_gguf(tmp_path / "last.gguf", 512 << 10, seed=31)
    with p.client() as client:
        create_model(client, LAST, gguf)

    # P's user copy, the only one, far beyond P's cache limit: never evicted.
    run_reconciles([p, q])
    assert LAST in held(store_of(p))

    # A replica on Q (no limit there yet).
    r = post(p, "/api/distributed/replicate", {"model": LAST, "factor": 2})
    assert r.status_code == 200, r.text
    wait_until(lambda: LAST in held(store_of(q)), timeout=DEADLINE, interval=0.2, what="Q to hold a replica")
    assert origin_on(q, LAST) == "replica"

    # P dies; Q restarts with the tiny cache limit: its replica is now the only copy on an alive node.
    p.kill9()
    q.kill9()
    q.start((), {**ENV, "OMX_MODELS__MAX_CACHE_SIZE": TINY_CACHE})
    assert p.node_id not in {i for i, s in q.statuses().items() if s == "alive"}
    run_reconciles([q])
    assert LAST in held(store_of(q)), "the last copy was evicted"
    assert sha256_of(blob_path(store_of(q), sha256_of(gguf))) == sha256_of(gguf)

    # P (with its user copy) comes back and rejoins: Q's replica beyond its cache limit is evicted,
    # P's copy stays.
    p.start((), {**ENV, "OMX_MODELS__MAX_CACHE_SIZE": TINY_CACHE})
    pair.wait_alive([p, q], [p, q])
    wait_until(lambda: LAST not in held(store_of(q)), timeout=DEADLINE, interval=0.2,
               what="Q to evict its replica")
    run_reconciles([p, q])
    assert LAST in held(store_of(p)) and LAST not in held(store_of(q))
    assert row(q, LAST)["nodes"] == [p.node_id]


# ------------------------------------------------------------------ retries back off (no sockets)


class _NoManifest:
    """A peer transport whose every manifest request fails (counted)."""

    def __init__(self) -> None:
        self.asked = 0

    async def manifest(self, peer: NodeId, name: str) -> bytes:
        self.asked += 1
        raise PeerError(f"{peer} is unreachable")

    async def blob_state(self, peer: NodeId, digest: BlobDigest) -> Any:
        raise AssertionError("no blob is fetched without a manifest")

    async def read_chunks(self, *args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("no chunk is fetched without a manifest")


class _Link:
    """The cluster as the replicator sees it: ``me`` (empty, room to spare) and ``peer`` holding one model."""

    node_id = "me"

    def __init__(self) -> None:
        self.snapshot = placement_cluster({"me": holdings(), "peer": holdings(placement_model("m"))})

    def cluster_snapshot(self) -> ClusterSnapshot:
        return self.snapshot

    def members(self) -> list[Any]:
        return []

    async def publish_inventory(self) -> None:
        return None

    async def refresh_peer(self, node: str) -> None:
        return None

    def api_of(self, node: str) -> str | None:
        return None


async def test_reconcile_retries_a_failed_fetch_only_after_a_growing_delay(tmp_path: Path) -> None:
    now = [1000.0]
    store = ModelStore(tmp_path / "store", chunk_size=CHUNK)
    transport = _NoManifest()
    replicator = Replicator(
        node_id="me", store=store, meta=HoldingsMeta(store.root), link=_Link(),
        transfers=Transfers(store.blobs, transport),  # type: ignore[arg-type]
        commands=PeerCommands("me", key=lambda: b"k" * 32, api_of=lambda node: None),
        settings=ReplicationSettings(default_factor=2, retry_s=10.0, max_retry_s=40.0), clock=lambda: now[0])

    async def round_() -> int:
        await replicator.reconcile()
        await asyncio.gather(*(f.task for f in list(replicator._fetches.values()) if f.task is not None))
        return transport.asked

    try:
        assert replicator.compute_plan().for_node(NodeId("me")).adds, "placement must pick this node"
        assert await round_() == 1
        failed = replicator.summary()
        assert failed.failed_replications == 1 and failed.transfers[0].state == "failed"
        assert "unreachable" in (failed.transfers[0].error or "")
        # Each failure in a row doubles the wait (10, 20, 40, then 40: the cap); rounds meanwhile start nothing.
        for delay, attempts in ((10.0, 2), (20.0, 3), (40.0, 4), (40.0, 5)):
            for _ in range(3):
                assert await round_() == attempts - 1
            now[0] += delay - 0.5
            assert await round_() == attempts - 1
            now[0] += 0.5
            assert await round_() == attempts
    finally:
        await replicator.stop()


async def test_a_migration_source_restores_the_factor_as_its_peers_plan_it(tmp_path: Path) -> None:
    """A migration's source keeps no placement rule of its own that its peers do not know.

    Every node carries out only the adds of its own plan, so when a holder dies after the migration and rendezvous
    picks the source for the new copy, the source's plan must pick itself too (found by the chaos soak: it skipped
    itself for an hour and every other node waited for it, so the model stayed under-replicated).
    """
    m = placement_model("m")
    other = next(n for n in (f"n{i}" for i in range(100)) if rank("m:latest", ["me", n])[0] == "me")
    link = _Link()
    link.snapshot = placement_cluster({"me": holdings(m), "keeper": holdings(m), "target": holdings(m),
                                       other: holdings()})
    store = ModelStore(tmp_path / "store", chunk_size=CHUNK)
    replicator = Replicator(
        node_id="me", store=store, meta=HoldingsMeta(store.root), link=link,
        transfers=Transfers(store.blobs, _NoManifest()),  # type: ignore[arg-type]
        commands=PeerCommands("me", key=lambda: b"k" * 32, api_of=lambda node: None),
        settings=ReplicationSettings(default_factor=2), clock=lambda: 1000.0)

    async def remove_local(model: str, digest: BlobDigest, reason: str) -> bool:
        return True

    replicator.remove_local = remove_local  # type: ignore[method-assign]
    try:
        assert await ReplicationService(replicator)._drop_own(m.name, m.digest, "target")
        link.snapshot = placement_cluster({"me": holdings(), "keeper": holdings(m), "target": holdings(m),
                                           other: holdings()}, dead={"target"})
        peers_plan = plan(link.snapshot, 2, 1000.0)
        assert {(a.key, a.node) for a in peers_plan.adds} == {("m:latest", "me")}
        assert replicator.compute_plan().adds == peers_plan.adds
    finally:
        await replicator.stop()
