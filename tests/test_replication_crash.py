"""Crash points of the replication paths: SIGKILL at every fsync/rename, restart, check every invariant.

As SQLite's crash tests do, the points are enumerated, not sampled: a clean run of each
operation (``tests/support/replication_crash_child.py``: a peer transfer, both halves of a
migration, a verify-repair) counts its ``fsync``/``replace``/``rename``/``link`` calls; then,
for each point N = 1, 2, ... until a run finishes before reaching N (a transfer records its
chunks in groups from a background sync, so its count varies a little), a fresh copy of
the operation's starting store is handed to a child that kills itself with SIGKILL at call N.
Right after the kill the store must hold:

- no manifest naming a missing or partial blob (except the model whose damaged blob a
  repair moved aside: a damaged copy is never served, and the restart fetches it back),
  no blob whose size or sha256 is wrong (except the rotten blob a repair has not replaced yet),
  no blob without its chunk index;
- partial blobs that resume: a readable state whose every claimed chunk holds the right bytes;
- ``holdings.json`` readable, its records naming the manifests there, at most one transfer under way.

Then the operation runs again (the restart) and must complete: the model held at the
peer's digest, every blob right, no partial or damage marker left, no transfer recorded.

The default run kills each operation at two points (its middle one and its last, after which
only clean-up remains); the ``soak`` run (``scripts/soak.sh``) at every point of all three.
One live peer (a real node with Serf and its transfer listener) serves every child.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from omx.storage import BlobStore, ModelStore
from omx.storage.chunks import verify_chunk
from omx.storage.damaged import damaged_blobs
from omx.storage.holdings_meta import HoldingsMeta
from omx.storage.partial import read_partial_state
from tests.support.cluster import ClusterNode, start_cluster
from tests.support.node import create_model
from tests.support.transfer import write_big_gguf

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

CS = 64 * 1024
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Peer:
    node: ClusterNode
    secret_hex: str
    digests: dict[str, str]
    """Manifest digest per model, as the peer holds it."""
    blobs: BlobStore

    def args(self) -> list[str]:
        return [self.node.node_id, f"{self.node.host}:8080", f"{self.node.host}:{self.node.info['transfer_port']}"]


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    root = tmp_path_factory.mktemp("repl-crash")
    cluster = start_cluster(root / "nodes", 1, env={"OMX_MODELS__CHUNK_SIZE": str(CS)})
    try:
        a = cluster[0]
        for name, size, seed in (("crash-xfer", 9 * CS + 100, 1), ("crash-mig", 3 * CS + 5, 2),
                                 ("crash-keep", 5 * CS + 17, 3)):
            with a.client() as client:
                create_model(client, name, write_big_gguf(root / f"{name}.gguf", size, seed=seed))
        tags = a.get("/api/tags")["models"]
        digests = {m["name"].removesuffix(":latest"): "sha256:" + m["digest"] for m in tags}
        yield Peer(a, cluster.secret_hex, digests, BlobStore(a.home / "data" / "models", chunk_size=CS))
    finally:
        cluster.close()


def run_child(peer: Peer, root: Path, op: str, *models: str, crash_at: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMX_CLUSTER_SECRET": peer.secret_hex, "PYTHONPATH": str(ROOT),
           "OMX_CRASH_AT": str(crash_at)}
    return subprocess.run([sys.executable, "-m", "tests.support.replication_crash_child", str(root), op,
                           *peer.args(), *models], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def clean_run(peer: Peer, root: Path, op: str, *models: str) -> int:
    done = run_child(peer, root, op, *models)
    assert done.returncode == 0, done.stderr[-4000:]
    return int(done.stdout.split()[-1])


def held(store: ModelStore) -> dict[str, str]:
    return {e.name.removesuffix(":latest"): "sha256:" + e.digest.removeprefix("sha256:")
            for e in store.list_models_sync()}


def check_invariants(peer: Peer, root: Path, *, rotten: str | None = None, moved_aside: str | None = None) -> None:
    store = ModelStore(root, chunk_size=CS)
    store.recover()
    for problem in store.check_sync(deep=True):
        allowed = rotten is not None and rotten in problem and (
            "does not match" in problem or (moved_aside is not None and problem.startswith(
                f"manifest registry.ollama.ai/library/{moved_aside}:latest: blob {rotten} is missing")))
        assert allowed, problem
    for digest in store.blobs.digests():
        assert store.blobs.stored_index(digest) is not None, digest
    partial = root / "partial"
    for path in sorted(partial.glob("*.data")) if partial.is_dir() else ():
        digest = "sha256:" + path.name.removeprefix("sha256-").removesuffix(".data")
        state = read_partial_state(store.blobs, digest)  # type: ignore[arg-type]
        if state is None:  # a state not written yet: open() starts over
            continue
        source = peer.blobs.path(digest).read_bytes()  # type: ignore[arg-type]
        assert state.size == len(source)
        data = path.read_bytes()
        for i in state.held():
            chunk = data[i * state.chunk_size:(i + 1) * state.chunk_size]
            assert chunk == source[i * state.chunk_size:(i + 1) * state.chunk_size], (digest, i)
            if state.chunks is not None:
                assert verify_chunk(chunk, state.chunks[i])
    meta = HoldingsMeta(root).state()
    assert not (root / "cluster" / "holdings.json.corrupt").exists()
    models = held(store)
    for record in meta.models.values():
        if record.name.removesuffix(":latest") in models:
            assert models[record.name.removesuffix(":latest")] == record.digest
    assert len(meta.incoming) <= 1


def check_done(peer: Peer, root: Path, present: list[str], absent: list[str] = ()) -> None:  # type: ignore[assignment]
    store = ModelStore(root, chunk_size=CS)
    assert store.check_sync(deep=True) == []
    models = held(store)
    for name in present:
        assert models[name] == peer.digests[name]
        assert HoldingsMeta(root).state().models  # the replica's record was written
    for name in absent:
        assert name not in models
    for digest in store.blobs.digests():
        assert "sha256:" + hashlib.sha256(store.blobs.path(digest).read_bytes()).hexdigest() == digest
    assert not any((root / "partial").glob("*")) if (root / "partial").is_dir() else True
    assert damaged_blobs(store.blobs) == []
    assert HoldingsMeta(root).state().incoming == {}


def crash_and_restart(peer: Peer, base: Path, work: Path, point: int, op: str, *models: str,
                      rotten: str | None = None, moved_aside: str | None = None) -> bool:
    """Kill ``op`` at ``point``, check the store, run ``op`` again; False when ``op`` made fewer calls
    this time and finished (chunk groups are recorded by a background sync, which may take in more
    chunks when the disk is slow)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work, symlinks=True)
    done = run_child(peer, work, op, *models, crash_at=point)
    if done.returncode == 0:
        assert int(done.stdout.split()[-1]) < point, done.stdout
        return False
    assert done.returncode == -signal.SIGKILL, f"{op}: not killed at point {point}: {done.stderr[-3000:]}"
    check_invariants(peer, work, rotten=rotten, moved_aside=moved_aside)
    clean_run(peer, work, op, *models)
    return True


def _base(peer: Peer, base: Path, op: str) -> tuple[tuple[str, ...], list[str], list[str], str | None]:
    """Prepare ``op``'s starting store; its arguments, the models present and absent once done, the rotten blob."""
    base.mkdir(parents=True)
    if op == "transfer":
        return ("crash-xfer",), ["crash-xfer"], [], None
    clean_run(peer, base, "transfer", "crash-keep")  # held here: a migration's source, a repair's patient
    if op == "migrate":
        return ("crash-mig", "crash-keep"), ["crash-mig"], ["crash-keep"], None
    store = ModelStore(base, chunk_size=CS)
    weights = max(store.blobs.digests(), key=lambda d: store.blobs.size(d))
    path = store.blobs.path(weights)
    raw = bytearray(path.read_bytes())
    raw[2 * CS + 10] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))
    return (), ["crash-keep"], [], weights


def enumerate_points(peer: Peer, tmp_path: Path, op: str, *, every: bool) -> int:
    """Kill ``op`` at every point (``every``: 1, 2, ... until a run finishes before its point), or at
    its middle one and its last (of a clean run's count, which it returns)."""
    base = tmp_path / "base"
    models, present, absent, rotten = _base(peer, base, op)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    total = clean_run(peer, probe, op, *models)
    check_done(peer, probe, present, absent)
    killed = 0
    for point in itertools.count(1) if every else ((total + 1) // 2, total):
        if not crash_and_restart(peer, base, tmp_path / "work", point, op, *models, rotten=rotten,
                                 moved_aside="crash-keep" if rotten else None):
            if every:
                break
            continue
        killed += 1
        check_done(peer, tmp_path / "work", present, absent)
    assert killed >= (total * 3 // 4 if every else 1), (killed, total)
    print(f"{op}: {total} points in a clean run, killed at {killed}")
    return total


def test_crash_points_of_a_peer_transfer(peer: Peer, tmp_path: Path) -> None:
    # chunk groups (fsync + bitmap), the index, the rename, the manifest, holdings.json
    assert enumerate_points(peer, tmp_path, "transfer", every=False) >= 8


def test_crash_points_of_a_migration(peer: Peer, tmp_path: Path) -> None:
    enumerate_points(peer, tmp_path, "migrate", every=False)


def test_crash_points_of_a_verify_repair(peer: Peer, tmp_path: Path) -> None:
    enumerate_points(peer, tmp_path, "repair", every=False)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("op", ["transfer", "migrate", "repair"])
def test_every_crash_point(peer: Peer, tmp_path: Path, op: str) -> None:
    enumerate_points(peer, tmp_path, op, every=True)
