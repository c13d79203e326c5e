"""Custom functions on three real nodes (real Serf, sockets, bubblewrap sandboxes, inference).

One module cluster; the model ``tiny`` is created on B, so a function on C that calls
``ctx.generate`` is routed through the cluster like any client request. The tests run in order: deploys
first, then redeploys under load, removal, a node that joins later (D), and a restart (C).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from omx.cli.main import cli
from tests.conftest import TINY_TEMPLATE
from tests.support.cluster import Cluster, ClusterNode, metric, start_cluster
from tests.support.node import create_model, wait_until

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

ENV = {"OMX_ENGINE__NUM_PARALLEL": "1", "OMX_MODELS__REGISTRY": "127.0.0.1:9"}
PARAMS = {"temperature": 0, "seed": 42, "num_ctx": 256}
DEADLINE = 60.0

SHOUT = '''
from omx.functions import function, Context

@function(timeout=10, memory_mb=256, concurrency=4)
async def shout(body: dict, ctx: Context) -> dict:
    ctx.log("shouting", body.get("text"))
    return {"text": body["text"].upper(), "node": ctx.node}
'''

GEN = '''
from omx.functions import function, Context

@function(path="/fn/tools/complete", timeout=60)
async def complete(body: dict, ctx: Context) -> dict:
    return await ctx.generate(model="tiny", prompt=body["prompt"], options=body.get("options"))
'''

COUNT = '''
from omx.functions import function

@function(methods=("GET", "POST"))
def count(body: dict):
    for i in range(body.get("n", 5)):
        yield {{"i": i, "v": {v}}}
'''

VERSIONED = '''
from omx.functions import function

@function(concurrency=8)
def which(body: dict) -> dict:
    return {{"v": {v}}}
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("functions") / "nodes", 3, env=ENV)
    try:
        a, b, _ = c.nodes
        with b.client() as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE, parameters=PARAMS)
        wait_until(lambda: any(m["name"] == "tiny:latest" for m in a.get("/api/tags")["models"]),
                   timeout=DEADLINE, what="A to list tiny")
        yield c
    finally:
        c.close()


def deploy(node: ClusterNode, filename: str, source: str) -> httpx.Response:
    return httpx.post(node.url + "/api/functions", json={"filename": filename, "source": source}, timeout=60)


def call(node: ClusterNode, path: str, body: Any = None, **kw: Any) -> httpx.Response:
    return httpx.post(node.url + path, json=body if body is not None else {}, timeout=60, **kw)


def serves(node: ClusterNode, path: str, body: Any, check: Any = None) -> bool:
    r = call(node, path, body)
    return r.status_code == 200 and (check is None or check(r.json()))


def listing(node: ClusterNode) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in node.get("/api/functions")["functions"]}


# ------------------------------------------------------------------ deploy and invoke


def test_a_function_deployed_on_a_answers_through_b_and_c(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    r = deploy(a, "shout.py", SHOUT)
    assert r.status_code == 201, r.text
    [row] = r.json()["functions"]
    assert (row["name"], row["path"], len(row["version"])) == ("shout", "/fn/shout", 64)
    for node in (a, b, c):
        wait_until(lambda n=node: serves(n, "/fn/shout", {"text": "hi"}), timeout=DEADLINE,
                   what=f"{node.label} to serve shout")
        answer = call(node, "/fn/shout", {"text": "hi"})
        assert answer.json() == {"text": "HI", "node": node.node_id}
        assert answer.headers["x-omx-node"] == node.node_id
    wait_until(lambda: sorted(listing(b)["shout"]["nodes"]) == sorted(n.node_id for n in cluster.nodes),
               timeout=DEADLINE, what="B to list shout on every node")
    row = listing(c)["shout"]
    assert row["version"] == r.json()["functions"][0]["version"] and row["calls"] >= 3
    assert row["p50_ms"] is not None and row["methods"] == ["POST"]
    assert metric(a, "omx_function_calls_total", function="shout", status="200") >= 1


def test_bad_bodies_and_unknown_paths_get_clear_errors(cluster: Cluster) -> None:
    a = cluster.nodes[0]
    missing = call(a, "/fn/nothing-here", {})
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(a.url + "/fn/shout", timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()
    bad = httpx.post(a.url + "/fn/shout", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "error" in bad.json()
    failing = call(a, "/fn/shout", {"no_text": 1})  # KeyError inside the handler
    assert failing.status_code >= 400 and "error" in failing.json()
    assert call(a, "/fn/shout", {"text": "ok"}).status_code == 200  # the pool still answers


def test_ctx_generate_returns_what_api_generate_returns(cluster: Cluster) -> None:
    a, _, c = cluster.nodes
    assert deploy(a, "gen.py", GEN).status_code == 201
    body = {"prompt": "the cat", "options": {"num_predict": 12, **PARAMS}}
    wait_until(lambda: serves(c, "/fn/tools/complete", body), timeout=DEADLINE, what="C to serve complete")
    via_function = call(c, "/fn/tools/complete", body).json()
    direct = httpx.post(a.url + "/api/generate", json={"model": "tiny", **body, "stream": False}, timeout=60)
    assert direct.status_code == 200, direct.text
    want = direct.json()
    for key in ("model", "response", "done", "done_reason", "eval_count", "prompt_eval_count"):
        assert via_function[key] == want[key], key
    assert via_function["response"]


def test_a_generator_streams_ndjson_or_sse(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    assert deploy(a, "count.py", COUNT.format(v=1)).status_code == 201
    wait_until(lambda: serves(b, "/fn/count", {"n": 1}), timeout=DEADLINE, what="B to serve count")
    with httpx.stream("POST", b.url + "/fn/count", json={"n": 4}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines == [{"i": i, "v": 1} for i in range(4)]
    with httpx.stream("GET", b.url + "/fn/count", headers={"Accept": "text/event-stream"}, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line]
    assert events == [{"i": i, "v": 1} for i in range(5)]


def test_logs_from_every_node_are_listed(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    for node in (b, c):
        assert call(node, "/fn/shout", {"text": f"from {node.label}"}).status_code == 200

    def logged() -> bool:
        rows = a.get("/api/functions/shout/logs")["logs"]
        return {b.node_id, c.node_id} <= {r["node"] for r in rows if r["line"].startswith("shouting from")}

    wait_until(logged, timeout=DEADLINE, what="A to list the lines logged on B and C")
    assert httpx.get(a.url + "/api/functions/nope/logs", timeout=10).status_code == 404


# ------------------------------------------------------------------ deploy errors


def test_deploy_errors_leave_nothing_deployed(cluster: Cluster) -> None:
    a = cluster.nodes[0]
    broken = deploy(a, "broken.py", "from omx.functions import function\n\n@function\ndef f(body):\n    return (\n")
    assert broken.status_code == 400 and "line" in broken.json()["error"], broken.text
    huge = deploy(a, "huge.py", "#" * (2 << 20))
    assert huge.status_code == 413 and "error" in huge.json()
    taken = deploy(a, "other.py", SHOUT)  # shout belongs to shout.py
    assert taken.status_code == 409 and "shout.py" in taken.json()["error"]
    path = deploy(a, "other.py", SHOUT.replace("@function(", '@function(name="yell", path="/fn/shout", '))
    assert path.status_code == 409 and "/fn/shout" in path.json()["error"]
    assert set(listing(a)) == {"shout", "complete", "count"}
    assert httpx.post(a.url + "/api/functions/shout/rollback", timeout=10).status_code == 409


# ------------------------------------------------------------------ versions under load


def test_redeploy_and_rollback_under_a_stream_of_calls_lose_no_call(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    assert deploy(a, "which.py", VERSIONED.format(v=1)).status_code == 201
    wait_until(lambda: serves(b, "/fn/which", {}) and serves(c, "/fn/which", {}), timeout=DEADLINE,
               what="B and C to serve which")
    seen: list[tuple[int, Any]] = []
    stop = threading.Event()

    def caller(node: ClusterNode) -> None:
        with httpx.Client(base_url=node.url, timeout=30) as client:
            while not stop.is_set():
                r = client.post("/fn/which", json={})
                seen.append((r.status_code, r.json()))

    threads = [threading.Thread(target=caller, args=(n,)) for n in (b, c, c)]
    for t in threads:
        t.start()
    try:
        assert deploy(a, "which.py", VERSIONED.format(v=2)).status_code == 201
        wait_until(lambda: seen and seen[-1][1] == {"v": 2}, timeout=DEADLINE, what="calls to reach version 2")
        back = httpx.post(a.url + "/api/functions/which/rollback", timeout=30)
        assert back.status_code == 200 and back.json()["name"] == "which", back.text
        wait_until(lambda: seen[-1][1] == {"v": 1}, timeout=DEADLINE, what="calls to be back on version 1")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {doc["v"] for _, doc in seen} == {1, 2}
    assert listing(a)["which"]["versions"] == []


# ------------------------------------------------------------------ the CLI


def omx(node: ClusterNode, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--host", node.url, *args])


def test_the_cli_deploys_lists_invokes_shows_logs_rolls_back_and_removes(cluster: Cluster,
                                                                         tmp_path: Path) -> None:
    a, b, _ = cluster.nodes
    source = tmp_path / "echo.py"
    source.write_text(SHOUT.replace("shout", "echo").replace(".upper()", ""))
    deployed = omx(a, "fn", "deploy", str(source))
    assert deployed.exit_code == 0 and "deployed echo at /fn/echo" in deployed.output, deployed.output
    wait_until(lambda: serves(b, "/fn/echo", {"text": "x"}), timeout=DEADLINE, what="B to serve echo")
    invoked = omx(b, "fn", "invoke", "echo", '{"text": "Hello"}')
    assert invoked.exit_code == 0 and json.loads(invoked.output) == {"text": "Hello", "node": b.node_id}
    streamed = omx(a, "fn", "invoke", "which")
    assert streamed.exit_code == 0 and json.loads(streamed.output) == {"v": 1}
    rows = json.loads(omx(a, "fn", "ls", "--json").output)["functions"]
    assert {"echo", "which"} <= {r["name"] for r in rows}
    assert "echo" in omx(a, "fn", "ls").output
    wait_until(lambda: "echoing Hello" in omx(a, "fn", "logs", "echo").output, timeout=DEADLINE,
               what="the CLI to show B's log line")
    source.write_text(source.read_text().replace('"node": ctx.node', '"node": ctx.node, "v": 2'))
    assert omx(a, "fn", "deploy", str(source)).exit_code == 0
    back = omx(a, "fn", "rollback", "echo")
    assert back.exit_code == 0 and "back on version" in back.output
    again = omx(a, "fn", "rollback", "echo")
    assert again.exit_code == 1 and "no previous version" in again.output
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    refused = omx(a, "fn", "deploy", str(broken))
    assert refused.exit_code == 1 and "line 1" in refused.output
    assert omx(a, "fn", "rm", "echo").exit_code == 0
    gone = omx(a, "fn", "invoke", "echo", "{}")
    assert gone.exit_code == 1 and "not found" in gone.output
    assert omx(a, "fn", "invoke", "which", "{not json").exit_code == 1


# ------------------------------------------------------------------ removal, late joiner, restart


def test_rm_removes_it_from_every_node(cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    gone = httpx.delete(b.url + "/api/functions/count", timeout=30)
    assert gone.status_code == 200 and gone.json() == {"status": "deleted"}
    for node in (a, b, c):
        wait_until(lambda n=node: call(n, "/fn/count", {}).status_code == 404, timeout=DEADLINE,
                   what=f"{node.label} to stop serving count")
        assert httpx.get(node.url + "/api/functions/count", timeout=10).status_code == 404
    assert httpx.delete(a.url + "/api/functions/count", timeout=10).status_code == 404


def test_a_node_that_joins_later_serves_every_function(cluster: Cluster) -> None:
    d = cluster.add_node("D", env=ENV)
    cluster.wait_alive(expected=[*cluster.nodes, d])
    wait_until(lambda: serves(d, "/fn/shout", {"text": "d"}), timeout=DEADLINE, what="D to serve shout")
    wait_until(lambda: serves(d, "/fn/which", {}, lambda doc: doc == {"v": 1}), timeout=DEADLINE,
               what="D to serve which v1")
    assert call(d, "/fn/count", {}).status_code == 404  # the removal reached it too
    assert set(listing(d)) == {"shout", "complete", "which"}  # echo (the CLI test) was removed too


def test_a_node_without_bubblewrap_syncs_the_table_but_refuses_to_run_functions(cluster: Cluster) -> None:
    serf = shutil.which("serf")
    assert serf is not None
    e = cluster.add_node("E", env={**ENV, "PATH": "/nonexistent", "OMX_SERF_BINARY": serf})
    cluster.wait_alive(expected=[*cluster.nodes, e])
    wait_until(lambda: "shout" in listing(e), timeout=DEADLINE, what="E to learn the function table")
    refused = call(e, "/fn/shout", {"text": "x"})
    assert refused.status_code == 503 and "bubblewrap" in refused.json()["error"]
    assert deploy(e, "late.py", SHOUT.replace("shout", "late")).status_code == 503
    assert e.node_id not in listing(cluster.nodes[0])["shout"]["nodes"]
    e.stop()


def test_a_restarted_node_still_serves_them(cluster: Cluster) -> None:
    a, _, c = cluster.nodes
    c.stop()
    assert (c.home / "functions" / "state.json").is_file()
    c.start(("--join", a.p2p), {**ENV, "OMX_CLUSTER_SECRET": cluster.secret_hex})
    for path, body in (("/fn/shout", {"text": "again"}), ("/fn/which", {})):
        wait_until(lambda p=path, b=body: serves(c, p, b), timeout=DEADLINE, what=f"restarted C to serve {path}")
    assert call(c, "/fn/shout", {"text": "x"}).headers["x-omx-node"] == c.node_id
