"""``omx status`` / ``omx nodes`` formatting against a FAKE cluster API, and ``--watch`` in a pty."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from click.testing import CliRunner
from rich.console import Console

from omx.cli.main import cli
from omx.cli.status_view import nodes_table, uptime_text
from tests.support.fake_cluster_api import FakeClusterApi, node_entry
from tests.support.node import wait_until

OMX = str(Path(sys.executable).parent / "omx")


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClusterApi]:
    monkeypatch.setenv("OMX_HOME", str(tmp_path / "home"))
    fake = FakeClusterApi().start()
    monkeypatch.setenv("OMX_HOST", fake.url)
    yield fake
    fake.stop()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_status_follows_the_docs_layout(api: FakeClusterApi) -> None:
    result = invoke("status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == ["• OllamaMax Cluster Status", "━" * 25, "✅ Overall Status: healthy"]
    assert re.fullmatch(r"• Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", lines[3])
    assert lines[4:10] == ["", "📦 Node Information", "   ID: omx-aaaa1111", "   Status: healthy",
                           "   Role: peer", "   Uptime: 0h 2m"]
    assert "   Size: 2 nodes (2 alive)" in lines
    assert "     omx-bbbb2222 alive at 127.0.0.2:8080" in lines
    assert lines[-5:] == ["", "📊 Quick Summary", "━" * 15, "✅ All systems operational",
                          "🚀 Ready to serve AI models"]
    assert "💾 Resource Usage" not in result.stdout


def test_status_verbose_adds_resources_models_and_services(api: FakeClusterApi) -> None:
    lines = invoke("status", "--verbose").stdout.splitlines()
    start = lines.index("💾 Resource Usage")
    assert lines[start:start + 4] == ["💾 Resource Usage", "   CPU: 15.2% (8 cores)",
                                      "   Memory: 25.0% (2GB / 8GB)", "   Disk: 20.0% (20GB / 100GB)"]
    start = lines.index("🤖 Model Information")
    assert lines[start:start + 6] == ["🤖 Model Information", "   Total Models: 2", "   Active Models: 1",
                                      "   Models:", "     🟢 phi3:mini (2GB) - 45 requests",
                                      "     📦 llama2:7b (7GB) - 23 requests"]
    start = lines.index("🔀 Routing (requests taken in here, by the node that served them)")
    assert lines[start + 1:start + 3] == ["   Waiting for a free slot: 2",
                                          "   phi3:mini: omx-aaaa1111 40, omx-bbbb2222 5"]
    start = lines.index("• Network Services")
    assert lines[start:start + 5] == ["• Network Services", "   API: listening on 127.0.0.1:8080",
                                      "   Web: off (web.enabled: false)", "   P2P: gossip on 127.0.0.1:4001",
                                      "   Connections: 3"]


def test_status_degraded_names_the_problem(api: FakeClusterApi) -> None:
    health = api.snapshot("/health")
    health["status"] = "degraded"
    health["services"]["p2p"] = False
    api.update("/health", health)
    result = invoke("status")
    assert result.exit_code == 0
    assert "⚠️  Overall Status: degraded" in result.stdout
    assert "Serf agent is down" in result.stdout
    assert "All systems operational" not in result.stdout
    assert "Membership: serf agent down" in result.stdout


def test_status_reports_failed_peer_and_standalone(api: FakeClusterApi) -> None:
    nodes = api.snapshot("/api/distributed/nodes")
    nodes["nodes"][1]["status"] = "failed"
    api.update("/api/distributed/nodes", nodes)
    out = invoke("status").stdout
    assert "⚠️  Peer omx-bbbb2222 is failed" in out and "All systems operational" not in out

    health = api.snapshot("/health")
    health["membership"] = "standalone"
    health["services"]["p2p"] = False
    api.update("/health", health)
    api.update("/api/distributed/nodes", {"nodes": [node_entry("omx-aaaa1111", me=True)]})
    out = invoke("status").stdout
    assert "Membership: standalone (serf is not installed: this node runs alone)" in out
    assert "Peers: none" in out and "All systems operational" in out


def test_status_json_combines_the_raw_documents(api: FakeClusterApi) -> None:
    data = json.loads(invoke("status", "--json").stdout)
    assert data == {"health": api.state["/health"], "status": api.state["/api/distributed/status"],
                    "nodes": api.state["/api/distributed/nodes"], "metrics": api.state["/api/distributed/metrics"]}


def test_status_without_a_node_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMX_HOME", str(tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OMX_HOST", f"127.0.0.1:{port}")
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"omx: no node is running at http://127.0.0.1:{port} (start one with 'omx start')"


def test_nodes_table_and_json(api: FakeClusterApi) -> None:
    header, me, peer = invoke("nodes").stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "ADDRESS", "MODELS", "CPU", "MEM", "DISK"]
    assert me.split() == ["omx-aaaa1111", "*", "-", "alive", "127.0.0.1:8080", "phi3:mini,", "llama2:7b",
                          "15%", "25%", "20%"]
    assert peer.split() == ["omx-bbbb2222", "-", "alive", "127.0.0.2:8080", "phi3:mini", "15%", "25%", "20%"]
    assert json.loads(invoke("nodes", "--json").stdout) == api.state["/api/distributed/nodes"]


def test_nodes_status_colours() -> None:
    nodes = [node_entry("omx-1", "alive"), node_entry("omx-2", "suspect"), node_entry("omx-3", "failed"),
             node_entry("omx-4", "left", resources=None)]
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, color_system="standard", width=200).print(nodes_table(nodes))
    text = buffer.getvalue()
    for code, word in (("32", "alive"), ("33", "suspect"), ("31", "failed"), ("2", "left")):
        assert f"\x1b[{code}m{word}" in text
    assert "omx-4" in text and text.count(" -   ") >= 1


def test_uptime_text() -> None:
    assert uptime_text(0) == "0h 0m"
    assert uptime_text(125.9) == "0h 2m"
    assert uptime_text(26 * 3600 + 61) == "26h 1m"


# ------------------------------------------------------------------ --watch in a pseudo-terminal


def _spawn_watch(api: FakeClusterApi, *args: str) -> pexpect.spawn:
    env = {**os.environ, "OMX_HOST": api.url, "TERM": "xterm-256color"}
    return pexpect.spawn(OMX, ["status", "--watch", *args], env=env, dimensions=(60, 160), timeout=30,
                         encoding="utf-8")


def _add_third_node(api: FakeClusterApi, status: str = "alive") -> None:
    nodes = api.snapshot("/api/distributed/nodes")
    nodes["nodes"] = [n for n in nodes["nodes"] if n["id"] != "omx-cccc3333"]
    nodes["nodes"].append(node_entry("omx-cccc3333", status, address="127.0.0.3:8080"))
    api.update("/api/distributed/nodes", nodes)
    summary = api.snapshot("/api/distributed/status")
    summary["cluster_size"] = 3
    summary["active_nodes"] = [n["id"] for n in nodes["nodes"] if n["status"] == "alive"]
    api.update("/api/distributed/status", summary)


def _ctrl_c_exits_cleanly(child: pexpect.spawn) -> None:
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.before and "Aborted" not in child.before


def test_watch_refreshes_on_events_and_exits_on_ctrl_c(api: FakeClusterApi) -> None:
    # A long interval: only events from the stream can cause the refreshes below.
    child = _spawn_watch(api, "--interval", "600")
    try:
        child.expect("Size: 2 nodes")
        wait_until(lambda: api.subscribers() == 1, timeout=30, what="the CLI to open the event stream")
        child.expect("live: event stream")
        _add_third_node(api)
        api.push({"type": "member", "change": "joined", "node": node_entry("omx-cccc3333"), "timestamp": "t"})
        child.expect("Size: 3 nodes \\(3 alive\\)")
        child.expect("last event: member omx-cccc3333 joined")
        _add_third_node(api, "failed")
        api.push({"type": "member", "change": "status", "node": node_entry("omx-cccc3333", "failed"),
                  "timestamp": "t"})
        child.expect("Peer omx-cccc3333 is failed")
        _ctrl_c_exits_cleanly(child)
    finally:
        child.close(force=True)


def test_watch_polls_when_the_event_stream_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClusterApi(events=False).start()
    try:
        child = _spawn_watch(fake, "--interval", "0.3")
        try:
            child.expect("polling every 0.3s")
            child.expect("Size: 2 nodes")
            _add_third_node(fake)
            child.expect("Size: 3 nodes")
            _ctrl_c_exits_cleanly(child)
        finally:
            child.close(force=True)
    finally:
        fake.stop()
