"""Any node answers for any model: routing between three real nodes (real Serf, sockets, inference).

One module cluster (``replication.factor`` 1, ``num_parallel`` 1) with models put where the
tests need them: ``tiny`` and ``tiny-long`` on B only, ``spread`` on B and C, ``c-only`` on C.
The tests run in order; the last ones kill C, then B.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_TEMPLATE
from tests.support.cluster import Cluster, ClusterNode, metric, start_cluster
from tests.support.node import create_model, wait_until
from tests.support.tiny_gguf import write_tiny_llama

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

ENV = {"OMX_ENGINE__NUM_PARALLEL": "1", "OMX_MODELS__REGISTRY": "127.0.0.1:9"}
PARAMS = {"temperature": 0, "seed": 42, "num_ctx": 256}
DEADLINE = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("routing")
    long_gguf = write_tiny_llama(root / "long.gguf", seed=7, n_ctx=8192)  # generations long enough to interrupt
    c = start_cluster(root / "nodes", 3, env=ENV)
    try:
        a, b, cc = c.nodes
        with b.client() as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE, parameters=PARAMS)
            create_model(client, "tiny-long", long_gguf, template=TINY_TEMPLATE,
                         parameters={**PARAMS, "num_ctx": 8192})
            create_model(client, "spread", tiny_gguf, template=TINY_TEMPLATE, parameters=PARAMS)
        with cc.client() as client:
            create_model(client, "spread", tiny_gguf, template=TINY_TEMPLATE, parameters=PARAMS)
            create_model(client, "c-only", tiny_gguf, template=TINY_TEMPLATE, parameters=PARAMS)
        wanted = {"tiny:latest": [b.node_id], "tiny-long:latest": [b.node_id], "c-only:latest": [cc.node_id],
                  "spread:latest": sorted([b.node_id, cc.node_id])}
        wait_until(lambda: all(held_by(a).get(k) == v for k, v in wanted.items()), timeout=DEADLINE,
                   what="A to list every model with its holders")
        yield c
    finally:
        c.close()


def held_by(node: ClusterNode) -> dict[str, list[str]]:
    return {m["name"]: m.get("held_by") for m in node.get("/api/tags")["models"]}



def post(node: ClusterNode, path: str, body: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
    return httpx.post(node.url + path, json=body, timeout=timeout)


def stream_lines(node: ClusterNode, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", node.url + path, json=body, timeout=60) as r:
        return r, [line for line in r.iter_lines() if line]


def runner(node: ClusterNode, model: str) -> dict[str, Any] | None:
    rows = node.get("/api/distributed/status")["runner_stats"]["runners"]
    return next((r for r in rows if r["model"] == model), None)


# ------------------------------------------------------------------ answers through any node

GEN = {"model": "tiny", "prompt": "the cat", "options": {"num_predict": 12}}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "options": {"num_predict": 12}}
OA_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "seed": 42,
           "temperature": 0}
OA_COMPLETE = {"model": "tiny", "prompt": "the cat", "max_tokens": 12, "seed": 42, "temperature": 0}


def _text(path: str, doc: dict[str, Any]) -> Any:
    if path == "/api/generate":
        return doc["response"], doc["eval_count"], doc["done_reason"]
    if path == "/api/chat":
        return doc["message"], doc["eval_count"]
    if path == "/v1/chat/completions":
        return doc["choices"][0]["message"]["content"], doc["usage"]["completion_tokens"]
    if path == "/v1/completions":
        return doc["choices"][0]["text"]
    if path == "/api/embed":
        return doc["embeddings"]
    if path == "/api/embeddings":
        return doc["embedding"]
    return [d["embedding"] for d in doc["data"]]


NON_STREAMED = [
    ("/api/generate", {**GEN, "stream": False}),
    ("/api/chat", {**CHAT, "stream": False}),
    ("/v1/chat/completions", OA_CHAT),
    ("/v1/completions", OA_COMPLETE),
    ("/api/embed", {"model": "tiny", "input": ["the cat", "a dog"]}),
    ("/api/embeddings", {"model": "tiny", "prompt": "the cat"}),
    ("/v1/embeddings", {"model": "tiny", "input": "the cat"}),
]


@pytest.mark.parametrize(("path", "body"), NON_STREAMED, ids=[p for p, _ in NON_STREAMED])
def test_a_model_held_only_by_b_answers_through_a_and_c_as_b_does(cluster: Cluster, path: str,
                                                                   body: dict[str, Any]) -> None:
    a, b, c = cluster.nodes
    direct = post(b, path, body)
    assert direct.status_code == 200, direct.text
    assert direct.headers["x-omx-node"] == b.node_id
    for entry in (a, c):
        routed = post(entry, path, body)
        assert routed.status_code == 200, routed.text
        assert routed.headers["x-omx-node"] == b.node_id
        assert "x-omx-load" not in routed.headers
        assert _text(path, routed.json()) == _text(path, direct.json())


def _tokens(path: str, lines: list[str]) -> tuple[list[Any], Any]:
    if path.startswith("/v1/"):
        events = [line.removeprefix("data: ") for line in lines]
        assert events[-1] == "[DONE]"
        docs = [json.loads(e) for e in events[:-1]]
        key = "delta" if path == "/v1/chat/completions" else None
        parts = [d["choices"][0]["delta"].get("content") if key else d["choices"][0]["text"]
                 for d in docs if d["choices"]]
        return parts, docs[-1]["choices"][0]["finish_reason"]
    docs = [json.loads(line) for line in lines]
    assert docs[-1]["done"] is True and docs[-1]["total_duration"] > 0 and docs[-1]["eval_count"] == 12
    field = "response" if path == "/api/generate" else "message"
    return [d[field] for d in docs[:-1]], docs[-1]["done_reason"]


STREAMED = [
    ("/api/generate", {**GEN, "stream": True}),
    ("/api/chat", {**CHAT, "stream": True}),
    ("/v1/chat/completions", {**OA_CHAT, "stream": True}),
    ("/v1/completions", {**OA_COMPLETE, "stream": True}),
]


@pytest.mark.parametrize(("path", "body"), STREAMED, ids=[p for p, _ in STREAMED])
def test_streams_come_through_a_and_c_line_for_line(cluster: Cluster, path: str, body: dict[str, Any]) -> None:
    a, b, c = cluster.nodes
    direct, expected = stream_lines(b, path, body)
    assert direct.status_code == 200 and direct.headers["x-omx-node"] == b.node_id
    for entry in (a, c):
        routed, lines = stream_lines(entry, path, body)
        assert routed.status_code == 200
        assert routed.headers["x-omx-node"] == b.node_id
        assert routed.headers["content-type"] == direct.headers["content-type"]
        assert _tokens(path, lines) == _tokens(path, expected)


def test_a_lists_and_shows_models_held_elsewhere(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    rows = {m["name"]: m for m in a.get("/api/tags")["models"]}
    assert rows["tiny:latest"]["held_by"] == [b.node_id]
    assert rows["tiny:latest"]["details"]["format"] == "gguf"  # as B lists it, details included
    assert rows["tiny:latest"]["digest"] == {m["name"]: m for m in b.get("/api/tags")["models"]}["tiny:latest"][
        "digest"]
    ids = {m["id"] for m in a.get("/v1/models")["data"]}
    assert {"tiny:latest", "spread:latest", "c-only:latest"} <= ids
    assert a.get("/v1/models/tiny")["id"] == "tiny:latest"
    shown = post(a, "/api/show", {"model": "tiny"})
    assert shown.status_code == 200
    assert shown.json() == post(b, "/api/show", {"model": "tiny"}).json()
    assert post(a, "/api/show", {"model": "nowhere"}).status_code == 404
    assert held_by(b)["c-only:latest"] == [c.node_id]  # every node lists the whole cluster
    # Past the transfer listener's 1 MiB, a forwarded call goes to the peer's API port instead.
    big_body = {"model": "tiny", "system": "x" * (1 << 20) + "y"}
    big = post(a, "/api/show", big_body)
    assert big.status_code == 200 and big.json() == post(b, "/api/show", big_body).json()


def test_ps_shows_what_every_node_has_loaded(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    assert post(a, "/api/generate", {**GEN, "stream": False}).status_code == 200
    rows = a.get("/api/ps")["models"]
    assert {"name": "tiny:latest", "node": b.node_id} in [{"name": r["name"], "node": r["node"]} for r in rows]
    assert all(r["node"] in {a.node_id, b.node_id, c.node_id} for r in rows)


def test_a_model_held_nowhere_is_ollamas_404(cluster: Cluster) -> None:
    a = cluster.nodes[0]
    for path in ("/api/generate", "/api/chat"):
        r = post(a, path, {"model": "nowhere", "prompt": "x", "messages": []})
        assert r.status_code == 404 and r.json() == {"error": "model 'nowhere' not found"}
    r = post(a, "/v1/chat/completions", {"model": "nowhere", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "nowhere" in r.json()["error"]["message"]


def test_a_hop_request_needs_the_peer_signature(cluster: Cluster) -> None:
    b = cluster.nodes[1]
    r = httpx.post(b.url + "/api/generate", json={**GEN, "stream": False}, headers={"X-Omx-Hop": "1"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]
    assert httpx.get(b.url + "/api/peer/load", timeout=10).status_code == 401


# ------------------------------------------------------------------ spreading load


def test_a_burst_through_a_is_served_by_both_holders(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    before = {n: metric(a, "omx_routed_requests_total", model="spread:latest", node=n) for n in (b.node_id, c.node_id)}
    served: list[str] = []
    statuses: list[int] = []

    def one() -> None:
        r = post(a, "/api/generate", {"model": "spread", "prompt": "the cat", "stream": False,
                                      "options": {"num_predict": 40}})
        statuses.append(r.status_code)
        served.append(r.headers.get("x-omx-node", ""))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * 8
    assert set(served) == {b.node_id, c.node_id}
    for n in (b.node_id, c.node_id):
        counted = metric(a, "omx_routed_requests_total", model="spread:latest", node=n) - before[n]
        assert counted == served.count(n)


def test_a_disconnecting_client_frees_the_remote_slot(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    assert post(b, "/api/generate", {"model": "tiny-long", "prompt": "", "keep_alive": -1}).status_code == 200
    row = runner(b, "tiny-long:latest")
    assert row is not None
    before = int(row["cancelled_generations"])
    body = {"model": "tiny-long", "prompt": "the cat", "options": {"num_predict": 8000}}
    with httpx.stream("POST", a.url + "/api/generate", json=body, timeout=60) as r:
        assert r.headers["x-omx-node"] == b.node_id
        lines = r.iter_lines()  # kept: a discarded line iterator would close the response
        assert json.loads(next(lines))["done"] is False
        os.kill(int(row["pid"]), signal.SIGSTOP)  # paused: it cannot finish before the client hangs up
        assert runner(b, "tiny-long:latest")["active_requests"] == 1  # type: ignore[index]
    os.kill(int(row["pid"]), signal.SIGCONT)
    wait_until(lambda: int(runner(b, "tiny-long:latest")["cancelled_generations"]) == before + 1,  # type: ignore[index]
               timeout=DEADLINE, what="B to cancel the generation")
    assert runner(b, "tiny-long:latest")["active_requests"] == 0  # type: ignore[index]


# ------------------------------------------------------------------ failures (these kill C, then B)


def test_kill9_of_a_holder_during_a_burst_loses_no_request(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    assert post(c, "/api/generate", {"model": "spread", "prompt": "", "keep_alive": -1}).status_code == 200
    row = runner(c, "spread:latest")
    assert row is not None
    retries_before = metric(a, "omx_route_retries_total")
    os.kill(int(row["pid"]), signal.SIGSTOP)  # C takes requests and answers none of them
    results: list[httpx.Response] = []

    def one() -> None:
        results.append(post(a, "/api/generate", {"model": "spread", "prompt": "the cat", "stream": False,
                                                 "options": {"num_predict": 20}}, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: runner(c, "spread:latest")["active_requests"] == 1,  # type: ignore[index]
                   timeout=DEADLINE, what="C to hold a request")
    finally:
        c.kill9()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200] * 10, [r.text for r in results if r.status_code != 200]
    assert all(r.json()["done"] is True and r.json()["eval_count"] == 20 for r in results)
    assert {r.headers["x-omx-node"] for r in results} == {b.node_id}
    assert metric(a, "omx_route_retries_total") > retries_before


def test_a_model_held_only_by_a_dead_node_is_503(cluster: Cluster) -> None:
    a, _, c = cluster.nodes
    cluster.wait_status([a], c.node_id, "failed")
    r = post(a, "/api/generate", {"model": "c-only", "prompt": "x", "stream": False})
    assert r.status_code == 503, r.text
    assert "down" in r.json()["error"] and c.node_id in r.json()["error"]
    assert int(r.headers["retry-after"]) > 0


def test_a_stream_cut_midway_ends_with_an_error_object(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    row = runner(b, "tiny-long:latest")
    assert row is not None
    body = {"model": "tiny-long", "prompt": "the cat", "options": {"num_predict": 8000}}
    with httpx.stream("POST", a.url + "/api/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        os.kill(int(row["pid"]), signal.SIGSTOP)  # the stream cannot end on its own
        b.kill9()
        rest = [json.loads(line) for line in lines if line]
    assert rest and "error" in rest[-1] and b.node_id in rest[-1]["error"]
    assert not any(doc.get("done") for doc in rest)
