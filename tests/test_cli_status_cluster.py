"""``status``, ``nodes`` and ``troubleshoot`` against a real 3-node cluster (real Serf agents)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pexpect
import psutil
import pytest
from click.testing import CliRunner

from omx.cli.main import cli
from tests.support.cluster import Cluster, cluster3  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.serf]

OMX = str(Path(sys.executable).parent / "omx")


def run(cluster: Cluster, *args: str, home: Path | None = None) -> Any:
    """The CLI pointed at node A (through its run/node.json when ``home`` is its home)."""
    env = {"OMX_HOME": str(home or cluster[0].home / "cli-home"), "OMX_HOST": None if home else cluster[0].url}
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False)


def test_nodes_lists_three_alive(cluster3: Cluster) -> None:  # noqa: F811
    data = json.loads(run(cluster3, "nodes", "--json").stdout)
    assert {n["id"]: n["status"] for n in data["nodes"]} == {n.node_id: "alive" for n in cluster3.nodes}
    rows = run(cluster3, "nodes").stdout.splitlines()
    assert rows[0].split()[:4] == ["ID", "NAME", "STATUS", "ADDRESS"]
    for node in cluster3.nodes:
        row = next(r for r in rows if r.startswith(node.node_id))
        assert "alive" in row.split() and f"{node.host}:8080" in row.split()


def test_status_basic_verbose_and_json(cluster3: Cluster) -> None:  # noqa: F811
    a, b, c = cluster3.nodes
    out = run(cluster3, "status").stdout
    lines = out.splitlines()
    assert lines[:3] == ["• OllamaMax Cluster Status", "━" * 25, "✅ Overall Status: healthy"]
    assert f"   ID: {a.node_id}" in lines and "   Role: peer" in lines
    assert f"   Membership: serf gossip on {a.host}:4001" in lines
    assert "   Size: 3 nodes (3 alive)" in lines
    for peer in (b, c):
        assert f"     {peer.node_id} alive at {peer.host}:8080" in lines
    assert lines[-2:] == ["✅ All systems operational", "🚀 Ready to serve AI models"]

    verbose = run(cluster3, "status", "--verbose").stdout.splitlines()
    assert "   CPU: " in "\n".join(verbose)
    cpu = next(line for line in verbose if line.startswith("   CPU: "))
    assert cpu.endswith(f"({psutil.cpu_count()} cores)")
    assert f"   API: listening on {a.host}:8080" in verbose
    assert f"   Web: dashboard at http://{a.host}:8081" in verbose
    assert f"   P2P: gossip on {a.host}:4001" in verbose

    data = json.loads(run(cluster3, "status", "--json").stdout)
    assert data["health"]["services"]["available_nodes"] == 3
    assert data["status"]["cluster_size"] == 3
    assert sorted(data["status"]["active_nodes"]) == sorted(n.node_id for n in cluster3.nodes)
    assert data["metrics"]["nodes_online"] == 3


def test_troubleshoot_on_a_cluster_node(cluster3: Cluster) -> None:  # noqa: F811
    # From A's own home: node.json gives the pid, so its bound ports count as its own.
    result = run(cluster3, "troubleshoot", home=cluster3[0].home)
    assert result.exit_code == 0, result.output
    assert "Checking serf agent... ✅ alive, 2 peers" in result.stdout
    assert "Checking peer connectivity... ✅ 2 peers answer" in result.stdout
    assert "Checking port availability... ✅" in result.stdout
    assert result.stdout.splitlines()[-2:] == ["✅ No issues detected!", "Your OllamaMax installation looks healthy."]


def test_watch_against_the_cluster(cluster3: Cluster) -> None:  # noqa: F811
    env = {**os.environ, "OMX_HOST": cluster3[0].url, "OMX_HOME": str(cluster3[0].home / "cli-home")}
    child = pexpect.spawn(OMX, ["status", "--watch", "--interval", "600"], env=env, dimensions=(60, 160),
                          timeout=30, encoding="utf-8")
    try:
        child.expect("Size: 3 nodes")
        child.expect("live: event stream")
        # The node's tick heartbeat (every 5 s) refreshes the view without any interval poll.
        child.expect("#3")
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0 and "Traceback" not in child.before
    finally:
        child.close(force=True)
