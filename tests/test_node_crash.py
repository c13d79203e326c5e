"""``kill -9`` of a node while it creates, copies, deletes models and receives blobs:
the restarted node opens a store whose every invariant holds."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from omx.storage import ModelStore
from tests.support.node import NodeProcess, start_node, upload_blob

pytestmark = pytest.mark.e2e


def _churn(url: str, gguf_digest: str, stop: threading.Event, seed: int) -> None:
    """Create, copy and delete models and upload blobs until the node dies."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                name = f"m{seed}-{i}"
                client.post("/api/create", json={"model": name, "files": {"tiny.gguf": gguf_digest},
                                                 "system": f"model {i}", "stream": False})
                client.post("/api/copy", json={"source": name, "destination": f"{name}-copy"})
                if i > 2:
                    client.request("DELETE", "/api/delete", json={"model": f"m{seed}-{i - 2}"})
                data = rng.randbytes(rng.randint(1, 3) * 2**20)
                client.post(f"/api/blobs/sha256:{hashlib.sha256(data).hexdigest()}", content=data)
        except httpx.HTTPError:
            return  # the node was killed under us


def _upload_slowly(url: str, size: int, killed: threading.Event) -> None:
    data = random.Random(size).randbytes(size)
    digest = hashlib.sha256(data).hexdigest()

    def body() -> Iterator[bytes]:
        for off in range(0, size, 2**20):
            if killed.is_set():
                return
            yield data[off: off + 2**20]

    try:
        httpx.post(f"{url}/api/blobs/sha256:{digest}", content=body(), timeout=30)
    except httpx.HTTPError:
        pass


def _assert_store_consistent(home: Path, tiny_gguf: Path) -> None:
    node = start_node(home)
    try:
        with node.client() as client:
            tags = client.get("/api/tags").json()["models"]
            for model in tags:
                shown = client.post("/api/show", json={"model": model["name"]})
                assert shown.status_code == 200, (model["name"], shown.text)
                assert shown.json()["details"]["format"] == "gguf"
            # The store keeps working: a fresh create after the crash succeeds.
            digest = upload_blob(client, tiny_gguf)
            r = client.post("/api/create", json={"model": "after-crash", "files": {"tiny.gguf": digest},
                                                 "stream": False})
            assert r.status_code == 200, r.text
        problems = ModelStore(home / "data" / "models").check_sync(deep=True)
        assert problems == []
    finally:
        node.stop()


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45, 0.8])
def test_kill_during_create_copy_delete_and_uploads(tmp_path: Path, tiny_gguf: Path, delay: float) -> None:
    home = tmp_path / "home"
    node: NodeProcess = start_node(home)
    with node.client() as client:
        digest = upload_blob(client, tiny_gguf)
    stop = threading.Event()
    workers = [threading.Thread(target=_churn, args=(node.url, digest, stop, seed)) for seed in (1, 2)]
    workers.append(threading.Thread(target=_upload_slowly, args=(node.url, 48 * 2**20, stop)))
    for w in workers:
        w.start()
    threading.Event().wait(delay)  # let the churn reach a different point for each parametrisation
    os.killpg(node.proc.pid, 9)
    node.proc.wait(10)
    stop.set()
    for w in workers:
        w.join(30)
    _assert_store_consistent(home, tiny_gguf)
