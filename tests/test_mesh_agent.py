"""The Serf agent supervisor: config file, argv, restart after crash, none after leave."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from omx.mesh import (
    AgentConfig,
    ClusterSecret,
    MemberChanged,
    Membership,
    SerfAgent,
    SerfAgentError,
    SerfConnectionError,
    SerfRPC,
    SerfRPCError,
    serf_available,
)
from tests.support.serf import eventually, require_serf, serf_pids

pytestmark = [pytest.mark.serf, pytest.mark.e2e]

DEADLINE_S = 30.0



@pytest.fixture
def serf(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_serf()
    yield
    assert serf_pids(str(tmp_path)) == [], "serf agents left running"


def config(name: str, host: str, **kw: object) -> AgentConfig:
    return AgentConfig(node_name=name, bind=host, port=4001, profile="local", **kw)  # type: ignore[arg-type]


def test_serf_available_reports_version() -> None:
    require_serf()
    ok, version = serf_available()
    assert ok and version and version[0].isdigit()
    assert serf_available("omx-no-such-serf-binary") == (False, None)


async def test_config_file_is_private_and_argv_carries_no_secret(serf: None, tmp_path: Path) -> None:
    key = ClusterSecret.generate().gossip_key()
    agent = SerfAgent(config("omx-s0000001", "127.77.2.1", encrypt_key=key, rpc_auth="rpc-token-xyz",
                             tags={"api": "127.77.2.1:8080"}), tmp_path / "a")
    await agent.start()
    try:
        assert stat.S_IMODE(agent.config_path.stat().st_mode) == 0o600
        conf = json.loads(agent.config_path.read_text())
        assert conf["encrypt_key"] == key and conf["rpc_auth"] == "rpc-token-xyz"
        assert conf["rpc_addr"] == f"127.0.0.1:{agent.rpc_port}" and conf["profile"] == "local"
        cmdline = (await asyncio.to_thread(Path(f"/proc/{agent.pid}/cmdline").read_bytes)).decode()
        assert key not in cmdline and "rpc-token-xyz" not in cmdline
        assert os.getpgid(agent.pid) == agent.pid  # its own process group
        with pytest.raises(SerfRPCError, match="(?i)auth"):
            await SerfRPC.connect("127.0.0.1", agent.rpc_port, "wrong-token", timeout=5)
        (me,) = await agent.rpc.members()
        assert (me.name, me.addr, me.port, dict(me.tags)) == (
            "omx-s0000001", "127.77.2.1", 4001, {"api": "127.77.2.1:8080"})
        await agent.set_tags({"inv": "3"}, delete=["api"])
        assert json.loads(agent.config_path.read_text())["tags"] == {"inv": "3"}
    finally:
        await agent.leave()
    assert agent.state == "left" and agent.pid is None


async def test_restart_after_crash_but_not_after_leave(serf: None, tmp_path: Path) -> None:
    agent = SerfAgent(config("omx-s0000002", "127.77.2.2"), tmp_path / "b", backoff_s=0.1)
    membership = Membership(agent)
    await membership.start()
    sub = membership.subscribe()
    try:
        first_pid = agent.pid
        assert first_pid is not None and membership.view.get("omx-s0000002").alive
        os.kill(first_pid, signal.SIGKILL)
        await eventually(lambda: agent.restarts == 1 and agent.running, "agent restarted")
        assert agent.pid != first_pid and agent.generation == 2
        # The control connection and the membership stream both came back.
        await membership.update_tags({"inv": "9"})
        while True:
            event = await sub.next(DEADLINE_S)
            if isinstance(event, MemberChanged) and event.after and event.after.tags.get("inv") == "9":
                break
        await membership.leave()
        assert agent.state == "left" and agent.pid is None
        # The supervisor task has finished, so nothing is left that could restart the agent.
        assert agent._supervisor is None and agent.pid is None and agent.restarts == 1
        assert serf_pids(str(tmp_path)) == []
        with pytest.raises(SerfConnectionError):
            await agent.rpc.members()
    finally:
        await membership.stop(leave=False)


async def test_start_failures_are_reported(serf: None, tmp_path: Path) -> None:
    missing = SerfAgent(config("omx-s0000003", "127.77.2.3"), tmp_path / "c", binary="omx-no-such-serf")
    with pytest.raises(SerfAgentError, match="cannot run"):
        await missing.start()
    first = SerfAgent(config("omx-s0000004", "127.77.2.4"), tmp_path / "d")
    await first.start()
    try:
        clash = SerfAgent(config("omx-s0000005", "127.77.2.4"), tmp_path / "e", restart=False)
        with pytest.raises(SerfAgentError, match="exited with status"):
            await clash.start()
        assert clash.state == "failed" and clash.pid is None
    finally:
        await first.stop(graceful=False)


CHILD = """
import asyncio, sys
from pathlib import Path
from omx.mesh import AgentConfig, SerfAgent

async def main():
    agent = SerfAgent(AgentConfig(node_name="omx-s0000006", bind="127.77.2.6", profile="local"), Path(sys.argv[1]))
    await agent.start()
    print(agent.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_agent_dies_with_its_parent(serf: None, tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path / "f"), stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), DEADLINE_S)
        serf_pid = int(line)
        assert serf_pids(str(tmp_path)) == [serf_pid]
        assert os.getsid(serf_pid) == serf_pid  # its own session: no hangup reaches it when the parent dies
        # Stopped, it cannot notice its closed pipe either: only the death signal can end it.
        os.kill(serf_pid, signal.SIGSTOP)
    finally:
        parent.kill()
        await parent.wait()
    try:
        await eventually(lambda: not serf_pids(str(tmp_path)), "serf died with its parent")
    finally:
        for pid in serf_pids(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
