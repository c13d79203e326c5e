"""The CLI against a real node: interactive ``omx run`` in a pseudo-terminal, and one-shot commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.support.node import NodeProcess

pytestmark = pytest.mark.e2e

OMX = str(Path(sys.executable).parent / "omx")


def _head(text: str) -> str:
    """A prefix of ``text`` that a terminal shows unchanged (no line breaks)."""
    return text.strip().splitlines()[0][:30]


def test_interactive_run_two_turns_with_history_then_ctrl_d(node: NodeProcess, tmp_path: Path) -> None:
    turn1 = [{"role": "user", "content": "hello there"}]
    with node.client() as http:
        # Short replies, so that both turns fit the tiny model's context.
        http.post("/api/create", json={"model": "tiny-chat", "from": "tiny", "parameters": {"num_predict": 12},
                                       "stream": False}).raise_for_status()

        def chat(messages: list[dict[str, str]]) -> dict[str, Any]:
            return http.post("/api/chat", json={"model": "tiny-chat", "messages": messages, "stream": False}).json()

        reply1 = chat(turn1)
        turn2 = [*turn1, {"role": "assistant", "content": reply1["message"]["content"]},
                 {"role": "user", "content": "the cat"}]
        reply2, alone = chat(turn2), chat(turn2[-1:])
    # The second answer depends on the history: the REPL must send it to get this reply.
    assert _head(reply2["message"]["content"]) != _head(alone["message"]["content"])

    env = {**os.environ, "OMX_HOST": node.url, "OMX_HOME": str(tmp_path), "TERM": "dumb"}
    child = pexpect.spawn(OMX, ["run", "tiny-chat"], env=env, encoding="utf-8", timeout=60, dimensions=(50, 400))
    try:
        child.expect_exact(">>> ")
        child.sendline("hello there")
        child.expect_exact(_head(reply1["message"]["content"]))
        child.expect_exact(">>> ")
        child.sendline("the cat")
        child.expect_exact(_head(reply2["message"]["content"]))
        child.expect_exact(">>> ")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_one_shot_commands(node: NodeProcess, tmp_path: Path) -> None:
    env = {**os.environ, "OMX_HOME": str(tmp_path)}
    base = [OMX, "--host", node.url]
    listed = json.loads(subprocess.run([*base, "list", "--json"], capture_output=True, text=True, env=env,
                                       timeout=60, check=True).stdout)
    assert "tiny:latest" in [m["name"] for m in listed["models"]]
    out = subprocess.run([*base, "run", "tiny", "hello world"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip()
    shown = subprocess.run([*base, "show", "tiny"], capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and "llama" in shown.stdout
    missing = subprocess.run([*base, "run", "nope", "hi"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode != 0 and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_client_commands_without_a_node(tmp_path: Path) -> None:
    env = {**os.environ, "OMX_HOME": str(tmp_path)}
    env.pop("OMX_HOST", None)
    r = subprocess.run([OMX, "--host", "http://127.0.0.1:9", "list"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no node is running" in r.stderr


def test_help_lists_available_commands_as_the_docs_show() -> None:
    for args, names in ((["--help"], ("start", "status", "troubleshoot", "proxy")), (["proxy", "--help"],
                                                                                    ("pull", "list"))):
        out = subprocess.run([OMX, *args], capture_output=True, text=True, timeout=60, check=True).stdout
        section = out.split("Available Commands:", 1)[1]
        for name in names:
            assert f"\n  {name} " in section
