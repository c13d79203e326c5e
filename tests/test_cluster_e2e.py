"""Three real nodes (processes, own homes, own 127.0.0.N, own Serf agents) forming one cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from omx.mesh import AgentConfig, ClusterSecret, JoinToken, SerfAgent, SerfRPCError, read_secret, sign
from tests.support.cluster import Cluster, cluster3, start_cluster  # noqa: F401
from tests.support.node import create_model, wait_until
from tests.support.serf import require_serf

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

DEADLINE_S = 40.0


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster of our own for tests that add, stop or kill members (``cluster3`` stays pristine)."""
    cluster = start_cluster(tmp_path_factory.mktemp("scratch"), 3)
    try:
        yield cluster
    finally:
        cluster.close()


def report(what: str, seconds: float) -> None:
    """Measured figure (printed with -s; never asserted)."""
    print(f"\n[cluster timing] {what}: {seconds:.2f}s")


def test_every_node_sees_three_alive(cluster3: Cluster) -> None:  # noqa: F811
    ids = {n.node_id for n in cluster3.nodes}
    for node in cluster3.nodes:
        nodes = node.nodes()
        assert {i for i, n in nodes.items() if n["status"] == "alive"} >= ids
        me = nodes[node.node_id]
        assert me["self"] is True and me["address"] == f"{node.host}:8080" and me["p2p_address"] == node.p2p
        for other in cluster3.nodes:
            rec = nodes[other.node_id]
            assert rec["address"] == f"{other.host}:8080"
            assert rec["self"] is (other is node)
        health = node.get("/health")
        assert health["status"] == "healthy" and health["membership"] == "serf"
        assert health["services"]["p2p"] is True and health["services"]["p2p_peers"] >= 2
        assert health["services"]["available_nodes"] >= 3
        info = json.loads((node.home / "run" / "node.json").read_text())
        assert info["serf"] is True and info["p2p_port"] == 4001 and info["p2p_address"] == node.p2p


def test_status_and_metrics_shapes(cluster3: Cluster) -> None:  # noqa: F811
    a = cluster3[0]
    status = a.get("/api/distributed/status")
    assert status["distributed_mode"] is True and status["fallback_mode"] is False
    assert set(status["active_nodes"]) >= {n.node_id for n in cluster3.nodes}
    assert status["integration_stats"]["serf_version"] == "0.8.2-dev"
    assert status["integration_stats"]["gossip_address"] == a.p2p
    node = status["node"]
    assert node["id"] == a.node_id and node["role"] == "peer"
    res = node["resources"]
    assert 0.0 <= res["cpu"] <= 1.0 and 0.0 < res["memory"] < 1.0 and 0.0 < res["disk"] < 1.0
    assert res["memory_total"] > res["memory_used"] > 0 and res["cpu_count"] >= 1
    assert node["services"] == {"api": a.url, "web": f"http://{a.host}:8081", "p2p": a.p2p}
    metrics = a.get("/api/distributed/metrics")
    assert metrics["node_id"] == a.node_id and metrics["is_leader"] is False
    assert metrics["nodes_online"] >= 3 and metrics["connected_peers"] >= 2


def test_join_token_and_secret_file(cluster3: Cluster) -> None:  # noqa: F811
    a, b, c = cluster3.nodes
    secret = read_secret(a.secret_path)
    assert (a.secret_path.stat().st_mode & 0o777) == 0o600
    # C joined by token: its secret file now holds the cluster's secret.
    assert read_secret(c.secret_path) == secret
    assert read_secret(b.secret_path) == secret  # B's came from OMX_CLUSTER_SECRET: kept for restarts too


def test_model_created_on_one_node_is_seen_by_the_others(scratch: Cluster, tiny_gguf: Path) -> None:
    a, b, c = scratch.nodes
    with a.client() as client:
        create_model(client, "cluster-tiny", tiny_gguf)
    for obs in (b, c, a):
        wait_until(lambda o=obs: "cluster-tiny:latest" in o.nodes()[a.node_id]["models"], timeout=DEADLINE_S,
                   what=f"{obs.label} to see A's new model")
    versions = {o.nodes()[a.node_id]["inventory_version"] for o in (a, b, c)}
    assert len(versions) == 1 and versions != {"0"}
    status = a.get("/api/distributed/status")
    assert [m["name"] for m in status["node"]["models"]] == ["cluster-tiny:latest"]
    size = a.nodes()[a.node_id]["model_sizes"]["cluster-tiny:latest"]
    assert size > tiny_gguf.stat().st_size  # the weights plus the config layer
    for node, status_word in ((a, "✅ Ready"), (b, "💤 Available")):
        listed = subprocess.run([sys.executable, "-c", "from omx.cli.main import main; main()", "--host", node.url,
                                 "proxy", "list", "--json"], capture_output=True, text=True, timeout=60, check=True)
        row = next(r for r in json.loads(listed.stdout)["models"] if r["name"] == "cluster-tiny:latest")
        assert row["status"] == status_word and row["size"] == size


def _signed(key: bytes, node: str = "omx-00000000") -> dict[str, str]:
    return sign(key, node, "GET", "/api/peer/inventory")


def test_inventory_needs_a_valid_fresh_signature(cluster3: Cluster) -> None:  # noqa: F811
    a = cluster3[0]
    key = read_secret(a.secret_path).peer_auth_key()
    url = a.url + "/api/peer/inventory"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=_signed(ClusterSecret.generate().peer_auth_key())).status_code == 401
    headers = _signed(key)
    ok = httpx.get(url, headers=headers)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["node_id"] == a.node_id and isinstance(body["models"], list) and "version" in body
    assert set(body["resources"]) >= {"cpu", "memory", "disk"}
    replay = httpx.get(url, headers=headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]
    stale = sign(key, "omx-00000000", "GET", "/api/peer/inventory", now=time.time() - 120)
    assert httpx.get(url, headers=stale).status_code == 401


async def test_agent_without_or_with_wrong_key_cannot_join(cluster3: Cluster, tmp_path: Path) -> None:  # noqa: F811
    require_serf()
    a = cluster3[0]
    for i, key in enumerate((ClusterSecret.generate().gossip_key(), None)):
        lease = cluster3.new_node(f"intruder{i}").lease
        name = f"omx-bad{i:05d}"
        agent = SerfAgent(AgentConfig(node_name=name, bind=lease.host, port=4001, profile="local",
                                      encrypt_key=key), tmp_path / name, restart=False)
        await agent.start()
        try:
            try:
                joined = await agent.join([a.p2p])
            except SerfRPCError:
                joined = 0
            assert joined == 0
            assert len(await agent.rpc.members()) == 1
            assert name not in a.nodes()
        finally:
            await agent.stop(graceful=False)


def test_metrics_parse_and_count_requests(cluster3: Cluster) -> None:  # noqa: F811
    b = cluster3[1]

    def health_count() -> float:
        text = httpx.get(b.url + "/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {"omx_http_requests", "omx_http_request_duration_seconds", "omx_cluster_members",
                "omx_models_loaded", "omx_store_chunks", "omx_generated_tokens"} <= set(families)
        members = {s.labels["status"]: s.value for s in families["omx_cluster_members"].samples}
        assert members["alive"] >= 3
        return sum(s.value for s in families["omx_http_requests"].samples
                   if s.name == "omx_http_requests_total" and s.labels == {"handler": "health", "status": "200"})

    before = health_count()
    for _ in range(3):
        assert httpx.get(b.url + "/health").status_code == 200
    assert health_count() >= before + 3


def test_api_keys_guard_client_endpoints(cluster3: Cluster) -> None:  # noqa: F811
    node = cluster3.add_node("keys", how="alone", env={"OMX_SECURITY__API_KEYS": '["k1"]',
                                                        "OMX_SECURITY__ADMIN_KEYS": '["a1"]'})
    try:
        for path in ("/api/tags", "/api/distributed/nodes", "/api/distributed/status"):
            assert httpx.get(node.url + path).status_code == 401
            assert httpx.get(node.url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert httpx.get(node.url + path, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert httpx.get(node.url + "/health").status_code == 200
        assert httpx.get(node.url + "/").status_code == 200
        assert httpx.get(node.url + "/api/cluster/token").status_code == 401
        not_admin = httpx.get(node.url + "/api/cluster/token", headers={"Authorization": "Bearer k1"})
        assert not_admin.status_code == 403 and "admin key" in not_admin.json()["error"]
        token = httpx.get(node.url + "/api/cluster/token", headers={"Authorization": "Bearer a1"})
        assert token.status_code == 200 and token.json()["token"].startswith("omx1.")
        omx = [sys.executable, "-c", "from omx.cli.main import main; main()", "--host", node.url, "list", "--json"]
        env = {k: v for k, v in os.environ.items() if k != "OMX_API_KEY"}
        refused = subprocess.run(omx, capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode != 0 and "API key" in refused.stderr and "Traceback" not in refused.stderr
        allowed = subprocess.run(omx, capture_output=True, text=True, timeout=60, env={**env, "OMX_API_KEY": "k1"})
        assert allowed.returncode == 0 and json.loads(allowed.stdout) == {"models": []}
    finally:
        node.stop()


async def _next(ws: Any, want: str, deadline_s: float = DEADLINE_S) -> dict[str, Any]:
    """The next message of type ``want`` (skipping ticks and node_state)."""
    end = time.monotonic() + deadline_s
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, end - time.monotonic())))
        if msg["type"] == want:
            return msg


async def _member(ws: Any, node_id: str, status: str, deadline_s: float = DEADLINE_S) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while True:
        msg = await _next(ws, "member", max(0.1, end - time.monotonic()))
        if msg["node"]["id"] == node_id and msg["node"]["status"] == status:
            return msg


async def test_event_stream_join_by_api_then_graceful_leave(scratch: Cluster) -> None:
    a, b, _ = scratch.nodes
    joiner = scratch.add_node("D", how="alone")
    async with websockets.connect(f"ws://{a.host}:8080/api/distributed/events?interval=0.5") as ws:
        snap = await _next(ws, "snapshot")
        assert {n["id"] for n in snap["nodes"]} >= {n.node_id for n in scratch.nodes}
        assert joiner.node_id not in {n["id"] for n in snap["nodes"]}
        tick = await _next(ws, "tick")
        assert tick["node_id"] == a.node_id and "websocket_connections" in tick and tick["websocket_connections"] >= 1
        started = time.monotonic()
        r = await asyncio.to_thread(httpx.post, joiner.url + "/api/cluster/join", json={"token": scratch.token()},
                                    timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["joined"] >= 1
        msg = await _member(ws, joiner.node_id, "alive")
        report("join through POST /api/cluster/join until A's stream shows it alive", time.monotonic() - started)
        assert msg["change"] in ("joined", "status") and msg["node"]["address"] == f"{joiner.host}:8080"
        assert read_secret(joiner.secret_path) == read_secret(a.secret_path)
        # The adopted secret brings the cluster's CA: the joiner's TLS files are rewritten under it.
        assert (joiner.home / "tls" / "ca.crt").read_bytes() == (a.home / "tls" / "ca.crt").read_bytes()
        served = await asyncio.to_thread(httpx.get, joiner.url + "/api/cluster/ca")
        assert served.text.encode() == (a.home / "tls" / "ca.crt").read_bytes()
        await asyncio.to_thread(scratch.wait_alive, [b], [joiner])
        started = time.monotonic()
        await asyncio.to_thread(joiner.stop)
        await _member(ws, joiner.node_id, "left")
        report("SIGTERM until A's stream shows the node left", time.monotonic() - started)
    await asyncio.to_thread(scratch.wait_status, [a, b], joiner.node_id, "left")


def test_join_by_address_then_kill9_is_seen_as_failed(scratch: Cluster) -> None:
    a, b, c = scratch.nodes
    started = time.monotonic()
    victim = scratch.add_node("E", how="address")
    scratch.wait_alive([a, b, c], [victim])
    report("start with --join until all three see the new node alive", time.monotonic() - started)
    started = time.monotonic()
    victim.kill9()
    scratch.wait_status([a, b], victim.node_id, "failed")
    report("kill -9 (node and agent) until A and B see it failed", time.monotonic() - started)
    assert all(s == "alive" for i, s in a.statuses().items() if i != victim.node_id and i in
               {n.node_id for n in scratch.nodes})
    status = a.get("/api/distributed/status")  # the failed node is no longer active; the others still are
    assert victim.node_id not in status["active_nodes"]
    assert {n.node_id for n in scratch.nodes} <= set(status["active_nodes"])


def test_join_without_secret_exits_2(cluster3: Cluster) -> None:  # noqa: F811
    import subprocess
    import sys

    node = cluster3.new_node("nosecret")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMX_")}
    env.update(OMX_HOME=str(node.home), OMX_P2P__PROFILE="local")
    proc = subprocess.run([sys.executable, "-c", "from omx.cli.main import main; main()", "start", "--host",
                           node.host, "--join", cluster3[0].p2p], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "secret" in (proc.stdout + proc.stderr)
    assert not (node.home / "cluster" / "secret").exists()


def test_token_endpoint_names_this_node_as_seed(cluster3: Cluster) -> None:  # noqa: F811
    a = cluster3[0]
    token = JoinToken.parse(a.get("/api/cluster/token")["token"])
    assert token.seeds == (a.p2p,) and token.secret == read_secret(a.secret_path)


def test_node_without_serf_runs_standalone(cluster3: Cluster) -> None:  # noqa: F811
    import sys

    node = cluster3.new_node("noserf")
    node.start((), {"PATH": str(Path(sys.executable).parent)})
    try:
        health = node.get("/health")
        assert health["status"] == "healthy" and health["membership"] == "standalone"
        assert health["services"]["p2p"] is False and health["services"]["available_nodes"] == 1
        assert "serf" in health["notes"]["membership"]
        status = node.get("/api/distributed/status")
        assert status["distributed_mode"] is False and status["fallback_mode"] is True
        assert status["active_nodes"] == [node.node_id]
        assert [n["id"] for n in node.get("/api/distributed/nodes")["nodes"]] == [node.node_id]
        assert json.loads((node.home / "run" / "node.json").read_text())["serf"] is False
    finally:
        node.stop()


def test_crashed_agent_is_restarted(cluster3: Cluster) -> None:  # noqa: F811
    import signal

    node = cluster3.add_node("crash", how="alone")
    try:
        first = node.serf_pid()
        assert first
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: node.get("/api/distributed/status")["integration_stats"]["agent_restarts"] == 1
                   and node.get("/health")["services"]["p2p"] is True, timeout=DEADLINE_S, interval=0.1,
                   what="the agent to be restarted")
        wait_until(lambda: node.serf_pid() not in (None, first), timeout=DEADLINE_S, what="node.json to follow")
    finally:
        node.stop()


def test_cluster_leave_keeps_the_node_serving_alone(scratch: Cluster) -> None:
    a, b, _ = scratch.nodes
    node = scratch.add_node("leaver", how="token")
    try:
        scratch.wait_alive([a, b], [node])
        r = httpx.post(node.url + "/api/cluster/leave", timeout=60)
        assert r.status_code == 200 and r.json()["left"] is True, r.text
        scratch.wait_status([a, b], node.node_id, "left")
        health = node.get("/health")
        assert health["status"] == "healthy" and health["membership"] == "standalone"
        assert health["services"]["p2p"] is False
        assert node.get("/api/tags") == {"models": []}
        assert [n["id"] for n in node.get("/api/distributed/nodes")["nodes"]] == [node.node_id]
    finally:
        node.stop()
