"""A node's children (runners, the Serf agent) get none of its environment and die with it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from omx.processes import HARMLESS_HOME, child_env, start_ticks
from omx.runtime.engine._process import runner_env
from tests.conftest import TINY_TEMPLATE
from tests.support.node import NodeProcess, create_model, start_node, wait_until
from tests.support.serf import require_serf

SECRET = "5e" * 32  # a valid OMX_CLUSTER_SECRET (32 bytes, hex)
API_KEY = "omx-test-key-7f3a9c"
STRAY = "stray-credential-b41d"  # something else an operator exported


# ------------------------------------------------------------------ the environment, as a pure function

def test_child_env_keeps_only_the_allowlist() -> None:
    environ = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "HOME": "/home/me", "OMX_CLUSTER_SECRET": SECRET,
               "OMX_API_KEY": API_KEY, "OMX_SECURITY__API_KEYS": f'["{API_KEY}"]', "AWS_SECRET": STRAY,
               "OMP_NUM_THREADS": "4", "OMX_OMP_TRICK": "x", "PYTHONPATH": "/elsewhere"}
    env = child_env(keep_prefixes=("OMP_", "OMX_"), environ=environ)
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "HOME": HARMLESS_HOME, "OMP_NUM_THREADS": "4"}
    assert child_env(environ={})["PATH"] == os.defpath
    assert child_env(extra={"PYTHONPATH": "/x"}, environ=environ)["PYTHONPATH"] == "/x"


def test_runner_env_carries_the_node_import_path_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMX_CLUSTER_SECRET", SECRET)
    monkeypatch.setenv("OMX_API_KEY", API_KEY)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    env = runner_env({"EXTRA": "1"})
    assert SECRET not in str(env) and API_KEY not in str(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["EXTRA"] == "1" and env["HOME"] == HARMLESS_HOME
    assert env["PYTHONPATH"].split(os.pathsep) == list(dict.fromkeys(p or os.getcwd() for p in sys.path))


def test_start_ticks_name_one_process() -> None:
    mine = start_ticks(os.getpid())
    assert mine is not None and mine == start_ticks(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = start_ticks(child.pid)
        assert theirs is not None and theirs >= mine and theirs != start_ticks(1)
    finally:
        child.kill()
        child.wait(timeout=20)
    assert start_ticks(child.pid) is None  # reaped


# ------------------------------------------------------------------ a real node

def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0") if "=" in item)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def keyed_node(tmp_path: Path, tiny_gguf: Path) -> Iterator[NodeProcess]:
    require_serf()
    node = start_node(tmp_path / "home", env={
        "OMX_CLUSTER_SECRET": SECRET, "OMX_SECURITY__API_KEYS": f'["{API_KEY}"]', "OMX_API_KEY": API_KEY,
        "OMX_ENGINE__NUM_CTX": "256", "STRAY_TOKEN": STRAY})
    try:
        with node.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            create_model(client, "tiny", tiny_gguf, template=TINY_TEMPLATE)
        yield node
    finally:
        node.stop()


@pytest.mark.e2e
@pytest.mark.serf
def test_runner_and_agent_hold_no_secret_and_die_with_a_killed_node(keyed_node: NodeProcess) -> None:
    with keyed_node.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        r = client.post("/api/generate", json={"model": "tiny", "prompt": "", "keep_alive": -1})
        assert r.status_code == 200, r.text
        status = client.get("/api/distributed/status").json()
    (runner,) = [row["pid"] for row in status["runner_stats"]["runners"]]
    agent = status["integration_stats"]["agent_pid"]
    assert isinstance(agent, int) and agent == json.loads((keyed_node.home / "run" / "node.json").read_text())[
        "serf_pid"]
    node_env = _environ(keyed_node.proc.pid)
    assert node_env["OMX_CLUSTER_SECRET"] == SECRET and node_env["STRAY_TOKEN"] == STRAY  # the test is armed
    children = {"runner": runner, "serf agent": agent}
    try:
        for name, pid in children.items():
            env = _environ(pid)
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            for value in (SECRET, API_KEY, STRAY):
                assert value.encode() not in raw, f"the {name} inherited {value!r}"
            assert not [key for key in env if key.startswith("OMX_")], (name, env)
            assert env["HOME"] == HARMLESS_HOME, (name, env)
        # Stopped children cannot notice a closed pipe: only the death signal can end them.
        for pid in children.values():
            os.kill(pid, signal.SIGSTOP)
        os.kill(keyed_node.proc.pid, signal.SIGKILL)
        keyed_node.proc.wait(timeout=20)
        for name, pid in children.items():
            wait_until(lambda pid=pid: _gone(pid), timeout=30, what=f"the {name} to die with its node")
    finally:
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
