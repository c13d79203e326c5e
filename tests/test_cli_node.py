"""``omx start`` / ``omx stop`` and how the CLI finds a node."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from omx.cli.client import discover_url
from omx.cli.main import cli
from omx.processes import start_ticks
from tests.support.fake_ollama_api import FakeOllamaApi

OMX = str(Path(sys.executable).parent / "omx")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OMX_HOST", raising=False)
    (tmp_path / "home" / "run").mkdir(parents=True)
    return tmp_path / "home"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=20)
    return child.pid


def _write_node_json(home: Path, pid: int, url: str, **extra: Any) -> None:
    (home / "run" / "node.json").write_text(json.dumps(
        {"pid": pid, "url": url, "api_port": 1, "web_port": None, "p2p_port": None, "node_id": "omx-0000abcd",
         "host": "127.0.0.1", **extra}))


# ------------------------------------------------------------------ discovery

def test_discovery_order(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "config.yaml").write_text("api:\n  host: 127.0.0.7\n  port: 9100\n")
    assert discover_url(None) == "http://127.0.0.7:9100"
    _write_node_json(home, os.getpid(), "http://127.0.0.3:9200")
    assert discover_url(None) == "http://127.0.0.3:9200"
    assert discover_url("127.0.0.4:9300") == "http://127.0.0.4:9300"
    _write_node_json(home, _dead_pid(), "http://127.0.0.3:9200")
    assert discover_url(None) == "http://127.0.0.7:9100"


def test_cli_uses_node_json_and_omx_host(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeOllamaApi(models=[]).start()
    try:
        _write_node_json(home, os.getpid(), fake.url)
        assert CliRunner().invoke(cli, ["list"]).exit_code == 0
        assert fake.bodies("/api/tags") == [None]
        monkeypatch.setenv("OMX_HOST", f"127.0.0.1:{_free_port()}")
        result = CliRunner().invoke(cli, ["list"])
        assert result.exit_code == 1 and "no node is running" in result.stderr
        assert CliRunner().invoke(cli, ["--host", fake.url, "ps"]).exit_code == 0
    finally:
        fake.stop()


def test_broken_config_exits_2_on_client_commands(home: Path) -> None:
    (home / "config.yaml").write_text("api:\n  port: -5\n")
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 2 and "api.port" in result.stderr


# ------------------------------------------------------------------ stop

def test_stop_signals_pid_and_waits(home: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_node_json(home, child.pid, "http://127.0.0.1:1", start_ticks=start_ticks(child.pid))
        result = CliRunner().invoke(cli, ["stop"])
        assert result.exit_code == 0, result.output
        assert result.stdout == f"Stopped node omx-0000abcd (pid {child.pid}).\n"
        assert child.wait(timeout=20) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait(timeout=20)


@pytest.mark.parametrize("recorded", ["earlier start", "no start time"])
def test_stop_leaves_a_process_that_reused_the_pid_alone(home: Path, recorded: str) -> None:
    # The node crashed; its pid now belongs to an unrelated process.
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        ticks = start_ticks(stranger.pid)
        assert ticks is not None
        extra = {"start_ticks": ticks - 100} if recorded == "earlier start" else {}
        _write_node_json(home, stranger.pid, "http://127.0.0.1:1", **extra)
        result = CliRunner().invoke(cli, ["stop"])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"omx: no node is running: pid {stranger.pid} from ")
        assert "is now another process" in result.stderr and result.stderr.count("\n") == 1
        assert stranger.poll() is None
        assert not (home / "run" / "node.json").exists()
    finally:
        stranger.kill()
        stranger.wait(timeout=20)
    assert stranger.returncode == -signal.SIGKILL  # alive until our own kill


def test_stop_without_node(home: Path) -> None:
    result = CliRunner().invoke(cli, ["stop"])
    assert result.exit_code == 1
    assert result.stderr.startswith("omx: no node is running") and result.stderr.count("\n") == 1
    _write_node_json(home, _dead_pid(), "http://127.0.0.1:1")
    result = CliRunner().invoke(cli, ["stop"])
    assert result.exit_code == 1 and "has exited" in result.stderr
    assert not (home / "run" / "node.json").exists()


# ------------------------------------------------------------------ start (flag handling, FAKE node)

@dataclasses.dataclass(frozen=True)
class _Ready:
    node_id: str
    url: str
    api_port: int
    web_port: int | None
    p2p_port: int | None
    config_path: Path | None
    h3_port: int | None = None


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A FAKE ``omx.runtime.node`` that records the settings and returns at once (flag tests only)."""
    seen: list[Any] = []

    async def run_node(settings: Any, *, on_ready: Callable[[Any], None] | None = None, stop: Any = None,
                       config_path: Path | None = None) -> None:
        seen.append(settings)
        assert on_ready is not None
        on_ready(_Ready("omx-1234abcd", f"http://{settings.api.host}:{settings.api.port}", settings.api.port,
                        settings.web.port, settings.p2p.port, None))

    module = types.ModuleType("omx.runtime.node")
    module.run_node = run_node  # type: ignore[attr-defined]
    module.NodeReady = _Ready  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "omx.runtime.node", module)
    return seen


def test_start_passes_flags_and_prints_banner(home: Path, fake_node: list[Any], tmp_path: Path) -> None:
    other = tmp_path / "other-home"
    args = ["start", "--home", str(other), "--host", "127.0.0.5:9400", "--web-port", "9401", "--p2p-port", "9402",
            "--join", "127.0.0.6:4001", "--join", "127.0.0.7:4001"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    settings = fake_node[0]
    assert (settings.api.host, settings.api.port, settings.web.port, settings.p2p.port) == (
        "127.0.0.5", 9400, 9401, 9402)
    assert settings.p2p.join == ["127.0.0.6:4001", "127.0.0.7:4001"]
    assert os.environ["OMX_HOME"] == str(other)
    lines = result.stdout.splitlines()
    assert lines[0] == "• Starting OllamaMax node..."
    assert "✅ Node started successfully" in lines
    assert "   API:  http://127.0.0.5:9400" in lines and "   Health: http://127.0.0.5:9400/health" in lines
    assert "   Web:  http://127.0.0.5:9401" in lines


def test_start_bad_config_exits_2_naming_key(home: Path, fake_node: list[Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  max_loaded_models: 0\n")
    result = CliRunner().invoke(cli, ["start", "--config", str(bad)])
    assert result.exit_code == 2
    assert "engine.max_loaded_models" in result.stderr
    assert fake_node == []


# ------------------------------------------------------------------ start/stop of a real node

@pytest.fixture
def real_node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, int]]:
    home = tmp_path / "real-home"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMX_")}
    env["OMX_HOME"] = str(home)
    proc = subprocess.Popen(
        [OMX, "start", "--host", "127.0.0.1", "--api-port", str(port), "--web-port", str(_free_port()),
         "--p2p-port", str(_free_port())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, home, port
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=20)
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.mark.e2e
def test_real_start_then_stop(real_node: tuple[subprocess.Popen[str], Path, int]) -> None:
    proc, home, port = real_node
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if line.startswith("Use 'ollama-distributed status'"):
            break
    assert "✅ Node started successfully" in seen, seen
    assert f"   API:  http://localhost:{port}" in seen
    node_json = home / "run" / "node.json"
    deadline = time.monotonic() + 30
    while not node_json.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    info = json.loads(node_json.read_text())
    assert info["pid"] == proc.pid and info["api_port"] == port
    assert info["start_ticks"] == start_ticks(proc.pid)  # what lets `omx stop` recognise it
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OMX_")}, "OMX_HOME": str(home)}
    listed = subprocess.run([OMX, "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"models": []}
    stopped = subprocess.run([OMX, "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert proc.wait(timeout=30) == 0
    assert not (home / "run" / "node.json").exists()
