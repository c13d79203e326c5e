"""``omx troubleshoot``: every ❌ case on real sockets, real stores and real files; the node is FAKE here."""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from click.testing import CliRunner

from omx.cli.checks import PortUse, disk_verdict, memory_verdict, port_verdict, verify_blob_sample
from omx.cli.main import cli
from omx.storage import ModelStore
from tests.support.fake_cluster_api import FakeClusterApi, node_entry

CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home whose config uses free ports and a small chunk size."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("OMX_HOME", str(path))
    monkeypatch.delenv("OMX_HOST", raising=False)
    monkeypatch.delenv("OMX_SERF_BINARY", raising=False)
    write_config(path, {})
    return path


def write_config(home: Path, changes: dict[str, dict[str, Any]]) -> None:
    config: dict[str, dict[str, Any]] = {"api": {"port": free_port()}, "web": {"port": free_port()},
                                         "p2p": {"port": free_port()}, "models": {"chunk_size": "64KiB"}}
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    (home / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def api(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClusterApi]:
    """A healthy fake node whose one peer (the fake itself) answers /health."""
    fake = FakeClusterApi().start()
    nodes = fake.snapshot("/api/distributed/nodes")
    nodes["nodes"][1]["address"] = fake.url.removeprefix("http://")
    fake.update("/api/distributed/nodes", nodes)
    monkeypatch.setenv("OMX_HOST", fake.url)
    yield fake
    fake.stop()


def troubleshoot(*args: str) -> Any:
    return CliRunner().invoke(cli, ["troubleshoot", *args], catch_exceptions=False)


def line_of(output: str, label: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"Checking {label}..."))


def make_store(home: Path, size: int = 5 * CHUNK + 100) -> tuple[ModelStore, Path]:
    store = ModelStore(home / "data" / "models", chunk_size=CHUNK)
    data = random.Random(1).randbytes(size)
    info = store.blobs.write_bytes(data)
    return store, store.blobs.own_path(info.digest)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_healthy_installation_matches_the_docs(api: FakeClusterApi, home: Path) -> None:
    make_store(home)
    result = troubleshoot()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:4] == ["🔧 OllamaMax Troubleshooting", "━" * 28, "Diagnosing common issues...", ""]
    for label in ("if service is running", "port availability", "configuration"):
        assert line_of(result.stdout, label) == f"Checking {label}... ✅"
    assert line_of(result.stdout, "serf").startswith("Checking serf... ✅ serf 0.8.2")
    assert line_of(result.stdout, "serf agent") == "Checking serf agent... ✅ alive, 1 peer"
    assert line_of(result.stdout, "peer connectivity") == "Checking peer connectivity... ✅ 1 peer answer"
    assert line_of(result.stdout, "model store") == "Checking model store... ✅"
    assert lines[-2:] == ["✅ No issues detected!", "Your OllamaMax installation looks healthy."]


def test_no_node_running(home: Path) -> None:
    result = troubleshoot()
    assert result.exit_code == 1
    line = line_of(result.stdout, "if service is running")
    assert line == f"Checking if service is running... ❌ no node is running from {home}"
    lines = result.stdout.splitlines()
    assert lines[lines.index(line) + 1] == "   Fix: start one with 'omx start'"
    assert line_of(result.stdout, "serf agent") == "Checking serf agent... ➖ node not running"
    assert result.stdout.splitlines()[-2] == "❌ 1 issue found."


def test_port_taken_by_another_program(home: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        write_config(home, {"api": {"port": port}})
        result = troubleshoot()
    assert result.exit_code == 1
    name = psutil.Process().name()
    assert line_of(result.stdout, "port availability") == (
        f"Checking port availability... ❌ port {port} (api) is in use by {name} (pid {os.getpid()})")
    assert "   Fix: stop that program or choose other ports" in result.stdout


def test_port_held_by_the_node_itself_is_fine() -> None:
    mine = PortUse(pid=4242, name="omx")
    assert port_verdict("api", 8080, False, mine, {4242, 4243}) is None
    assert port_verdict("p2p", 4001, False, PortUse(4243, "serf"), {4242, 4243}) is None
    assert port_verdict("api", 8080, True, None, set()) is None
    assert port_verdict("web", 8081, False, None, set()) == "port 8081 (web) is in use by another program"


def test_serf_missing_by_override(api: FakeClusterApi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OMX_SERF_BINARY", str(tmp_path / "no-such-serf"))
    result = troubleshoot()
    assert result.exit_code == 1
    assert line_of(result.stdout, "serf") == (
        f"Checking serf... ❌ the serf binary '{tmp_path / 'no-such-serf'}' is not installed or does not run")
    assert "install it (apt install serf) or set OMX_SERF_BINARY" in result.stdout


def test_serf_missing_from_path(api: FakeClusterApi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    health = api.snapshot("/health")
    health["membership"] = "standalone"
    health["services"]["p2p"] = False
    api.update("/health", health)
    result = troubleshoot()
    assert result.exit_code == 1
    assert line_of(result.stdout, "serf") == (
        "Checking serf... ❌ the serf binary 'serf' is not installed or does not run")
    # Without serf, a standalone node is expected: the agent check is skipped, not failed twice.
    assert line_of(result.stdout, "serf agent") == (
        "Checking serf agent... ➖ serf is not installed: the node runs alone")
    # Without bubblewrap the node still runs, but refuses custom functions, and says so.
    assert line_of(result.stdout, "function sandbox").startswith(
        "Checking function sandbox... ⚠️ bubblewrap is not installed (apt install bubblewrap)")


def test_agent_dead(api: FakeClusterApi) -> None:
    health = api.snapshot("/health")
    health["status"] = "degraded"
    health["services"]["p2p"] = False
    api.update("/health", health)
    result = troubleshoot()
    assert result.exit_code == 1
    assert line_of(result.stdout, "serf agent") == (
        "Checking serf agent... ❌ the node's serf agent is not running (no gossip, no peers)")
    assert "   Fix: restart the node (omx stop && omx start) and read its log" in result.stdout


def test_standalone_although_serf_is_installed(api: FakeClusterApi) -> None:
    health = api.snapshot("/health")
    health["membership"] = "standalone"
    health["services"]["p2p"] = False
    api.update("/health", health)
    result = troubleshoot()
    assert result.exit_code == 1
    assert line_of(result.stdout, "serf agent") == (
        "Checking serf agent... ❌ the node runs standalone although serf is installed")


def test_unreachable_peer(api: FakeClusterApi) -> None:
    nodes = api.snapshot("/api/distributed/nodes")
    dead = f"127.0.0.1:{free_port()}"
    nodes["nodes"].append(node_entry("omx-dead0000", address=dead))
    api.update("/api/distributed/nodes", nodes)
    result = troubleshoot()
    assert result.exit_code == 1
    assert line_of(result.stdout, "peer connectivity") == (
        f"Checking peer connectivity... ❌ no answer from omx-dead0000 ({dead})")


def test_corrupted_blob_same_size(api: FakeClusterApi, home: Path) -> None:
    store, blob = make_store(home)
    flip_byte(blob, 3 * CHUNK + 17)
    # The store's own quick check only compares sizes: the flip needs the chunk hashes to show.
    assert store.check_sync(deep=False) == []
    result = troubleshoot()
    assert result.exit_code == 1
    digest = "sha256:" + blob.name.removeprefix("sha256-")
    assert line_of(result.stdout, "model store") == (
        f"Checking model store... ❌ blob {digest} is corrupt (chunk 3 does not match its hash)")
    deep = troubleshoot("--deep")
    assert deep.exit_code == 1
    assert line_of(deep.stdout, "model store") == (
        f"Checking model store... ❌ blob {digest} does not match its digest or index")


def test_sampled_verification_of_large_blobs(home: Path) -> None:
    store, blob = make_store(home, size=10 * CHUNK)
    index = store.blobs.stored_index(store.blobs.digests()[0])
    assert index is not None
    assert verify_blob_sample(blob, index, full_limit=CHUNK) is None
    flip_byte(blob, 10 * CHUNK - 1)  # the last chunk is always sampled
    assert verify_blob_sample(blob, index, full_limit=CHUNK) == 9


def test_invalid_config_names_the_key(home: Path) -> None:
    (home / "config.yaml").write_text("api:\n  port: lots\n")
    result = troubleshoot()
    assert result.exit_code == 1
    line = line_of(result.stdout, "configuration")
    assert line.startswith("Checking configuration... ❌ invalid config key 'api.port'")
    assert f"   Fix: fix that key in {home / 'config.yaml'}" in result.stdout
    assert line_of(result.stdout, "model store") == "Checking model store... ➖ configuration is invalid"


def test_json_report(api: FakeClusterApi, home: Path) -> None:
    (home / "config.yaml").write_text("engine:\n  num_parallel: 0\n")
    result = troubleshoot("--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["healthy"] is False and data["problems"] == 1
    keys = [c["key"] for c in data["checks"]]
    assert keys == ["running", "ports", "serf", "agent", "peers", "disk", "memory", "config", "store", "sandbox"]
    assert data["checks"][-1]["outcome"] == "ok"  # bubblewrap is part of the setup
    config = data["checks"][keys.index("config")]
    assert config["outcome"] == "fail" and "engine.num_parallel" in config["detail"]


def test_resource_verdicts() -> None:
    gib = 2**30
    assert disk_verdict(500 * 2**20, 100 * gib, 10 * 10**9, 0)[0] == "fail"
    assert disk_verdict(2 * gib, 1000 * gib, 1, 0)[0] == "fail"  # under 5 %
    assert disk_verdict(50 * gib, 100 * gib, 10 * 10**9, 0)[0] == "ok"
    outcome, detail = disk_verdict(5 * gib, 50 * gib, 20 * 10**9, 10**9)
    assert outcome == "warn" and "cannot fit" in detail
    assert memory_verdict(100 * 2**20, 8 * gib)[0] == "fail"
    assert memory_verdict(4 * gib, 8 * gib)[0] == "ok"
