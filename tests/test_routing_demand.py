"""Holding queue, backpressure and replicas that follow demand, on three real nodes with a timed engine double.

One module cluster: every token takes 20 ms (:mod:`tests.support.timed_engine`), ``num_parallel`` 1,
``engine.max_queue`` 4, ``routing.queue_timeout`` 2 s, ``replication.max_factor`` 2 and
``replication.idle_after`` 3 s. The model ``hot`` is created on B only; clients talk to A.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_TEMPLATE
from tests.support.cluster import Cluster, ClusterNode, metric, start_cluster
from tests.support.node import create_model, wait_until
from tests.support.timed_engine import timed_engine_env

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

DEADLINE = 60.0
HOT = "hot:latest"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("demand")
    env = {**timed_engine_env(root / "site", 0.02), "OMX_ENGINE__NUM_PARALLEL": "1", "OMX_ENGINE__MAX_QUEUE": "4",
           "OMX_ROUTING__QUEUE_TIMEOUT": "2s", "OMX_REPLICATION__MAX_FACTOR": "2",
           "OMX_REPLICATION__IDLE_AFTER": "3s", "OMX_MODELS__REGISTRY": "127.0.0.1:9"}
    c = start_cluster(root / "nodes", 3, env=env)
    try:
        a, b, _ = c.nodes
        with b.client() as client:
            create_model(client, "hot", tiny_gguf, template=TINY_TEMPLATE)
        wait_until(lambda: held_by(a).get(HOT) == [b.node_id], timeout=DEADLINE, what="A to see hot on B")
        yield c
    finally:
        c.close()


def held_by(node: ClusterNode) -> dict[str, list[str]]:
    return {m["name"]: m.get("held_by") for m in node.get("/api/tags")["models"]}


def generate(node: ClusterNode, tokens: int, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": "hot", "prompt": "the cat", "stream": False, "options": {"num_predict": tokens}}
    if client is not None:
        return client.post("/api/generate", json=body)
    return httpx.post(node.url + "/api/generate", json=body, timeout=60)


class Load:
    """Closed-loop clients sending short requests to one node until stopped."""

    def __init__(self, node: ClusterNode, clients: int) -> None:
        self.node = node
        self.served: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        with self.node.client() as client:
            while not self._stop.is_set():
                r = generate(self.node, 10, client)
                self.statuses[r.status_code] += 1
                self.served[r.headers.get("x-omx-node", "")] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_a_model_busy_on_its_only_holder_gains_a_replica_on_an_idle_node_and_the_load_spreads(
        cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    assert generate(a, 1).headers["x-omx-node"] == b.node_id  # B's runner is up
    before = {n.node_id: metric(a, "omx_routed_requests_total", model=HOT, node=n.node_id) for n in cluster.nodes}
    with Load(a, clients=3) as load:
        nodes = wait_until(lambda: (n := a.nodes())[b.node_id]["in_flight"] == 1 and n, timeout=DEADLINE,
                           what="A to show B's request in flight")
        assert HOT in nodes[b.node_id]["loaded"]
        assert all({"in_flight", "queued", "loaded"} <= set(n) for n in nodes.values())
        wait_until(lambda: len(held_by(a)[HOT]) == 2, timeout=DEADLINE, what="a second holder of hot")
        added = next(n for n in held_by(a)[HOT] if n != b.node_id)
        assert added in {a.node_id, c.node_id}
        wait_until(lambda: load.served[added] >= 3, timeout=DEADLINE, what="the new holder to serve requests")
        assert len(held_by(a)[HOT]) == 2  # in use: kept although the factor is 1
    assert set(load.statuses) == {200}
    assert load.served[b.node_id] > 0
    for node in (b.node_id, added):
        counted = metric(a, "omx_routed_requests_total", model=HOT, node=node) - before[node]
        assert counted == load.served[node]
    status = a.get("/api/distributed/status")["routing"]
    assert {"model": HOT, "node": added} in [{k: r[k] for k in ("model", "node")} for r in status["requests"]]
    # idle for replication.idle_after (3 s): the demand copy goes, the user's copy on B stays
    wait_until(lambda: held_by(a)[HOT] == [b.node_id], timeout=DEADLINE, what="the demand copy to be dropped")
    wait_until(lambda: held_by(b)[HOT] == [b.node_id], timeout=DEADLINE, what="B to see its copy as the only one")
    assert generate(a, 1).headers["x-omx-node"] == b.node_id


def test_a_full_holding_queue_refuses_and_a_held_request_times_out_both_with_retry_after(cluster: Cluster) -> None:
    a, _, _ = cluster.nodes
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(generate(a, 150))  # 3 s a request: longer than routing.queue_timeout

    threads = [threading.Thread(target=one) for _ in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results if r.status_code != 200]
    assert len(results) == 9 and all(r.status_code == 503 for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    errors = [r.json()["error"] for r in refused]
    assert any("already waiting" in e for e in errors)  # more than engine.max_queue (4) waiting: at once
    assert any("routing.queue_timeout" in e for e in errors)  # waited 2 s for a slot
    assert any(r.status_code == 200 for r in results)
