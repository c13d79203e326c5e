"""``omx run`` against a FAKE Ollama API: one-shot streaming, flags, and the interactive chat in a pty."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from omx.cli.main import cli
from tests.support.fake_ollama_api import SLOW_PROMPT, FakeOllamaApi

OMX = str(Path(sys.executable).parent / "omx")
SHOW = {"details": {"parameter_size": "268.10M"}, "model_info": {}, "capabilities": ["completion"]}


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllamaApi]:
    fake = FakeOllamaApi(show={"gemma3:270m": SHOW}).start()
    monkeypatch.setenv("OMX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMX_HOST", fake.url)
    yield fake
    fake.stop()


def test_run_with_prompt_streams_generate(api: FakeOllamaApi) -> None:
    result = CliRunner().invoke(cli, ["run", "gemma3:270m", "Say", "hi"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello, world\n"
    assert api.bodies("/api/generate") == [{"model": "gemma3:270m", "prompt": "Say hi", "stream": True}]


def test_run_flags_and_verbose(api: FakeOllamaApi) -> None:
    args = ["run", "gemma3:270m", "hi", "--format", "json", "--system", "terse", "--keepalive", "10m", "--verbose"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert api.bodies("/api/generate") == [{"model": "gemma3:270m", "prompt": "hi", "stream": True,
                                            "format": "json", "keep_alive": "10m", "system": "terse"}]
    assert "total duration:       1.5s" in result.stderr
    assert "eval rate:            20.00 tokens/s" in result.stderr
    assert "Hello, world" in result.stdout and "duration" not in result.stdout


def test_run_reads_piped_stdin(api: FakeOllamaApi) -> None:
    result = CliRunner().invoke(cli, ["run", "gemma3:270m", "Summarize:"], input="some text\n")
    assert result.exit_code == 0
    assert api.bodies("/api/generate")[0]["prompt"] == "some text\n Summarize:"


def test_run_missing_model_prints_ollama_error(api: FakeOllamaApi) -> None:
    result = CliRunner().invoke(cli, ["run", "nope", "hi"])
    assert result.exit_code == 1
    assert result.stderr == "Error: model 'nope' not found\n"


def _spawn(api: FakeOllamaApi, tmp_path: Path, *args: str) -> pexpect.spawn:
    env = {**os.environ, "OMX_HOST": api.url, "OMX_HOME": str(tmp_path / "home"), "TERM": "dumb"}
    return pexpect.spawn(OMX, ["run", *args], env=env, encoding="utf-8", timeout=30, dimensions=(40, 200))


def test_interactive_chat_keeps_history_and_ctrl_d_exits_0(api: FakeOllamaApi, tmp_path: Path) -> None:
    child = _spawn(api, tmp_path, "gemma3:270m")
    try:
        child.expect_exact(">>> ")
        child.sendline("first question")
        child.expect_exact("reply 1 to first question")
        child.expect_exact(">>> ")
        child.sendline("second")
        child.expect_exact("reply 2 to second")
        child.expect_exact(">>> ")
        child.sendline("/?")
        child.expect_exact("/bye")
        child.expect_exact(">>> ")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    chats = api.bodies("/api/chat")
    assert len(chats) == 2
    assert chats[1]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "reply 1 to first question"},
        {"role": "user", "content": "second"},
    ]


def test_interactive_ctrl_c_cancels_reply_clear_and_bye(api: FakeOllamaApi, tmp_path: Path) -> None:
    child = _spawn(api, tmp_path, "gemma3:270m")
    try:
        child.expect_exact(">>> ")
        child.sendline("hello")
        child.expect_exact("reply 1 to hello")
        child.expect_exact(">>> ")
        child.sendline(SLOW_PROMPT)
        child.expect_exact("tick tick ")
        child.sendintr()
        child.expect_exact(">>> ")
        child.sendline("after")
        # The cancelled turn is not part of the history.
        child.expect_exact("reply 2 to after")
        child.expect_exact(">>> ")
        child.sendline("/clear")
        child.expect_exact("Cleared session context")
        child.expect_exact(">>> ")
        child.sendline("fresh")
        child.expect_exact("reply 1 to fresh")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert [m["content"] for m in api.bodies("/api/chat")[2]["messages"]] == ["hello", "reply 1 to hello", "after"]
    assert api.bodies("/api/chat")[3]["messages"] == [{"role": "user", "content": "fresh"}]


def test_interactive_missing_model_exits_1(api: FakeOllamaApi, tmp_path: Path) -> None:
    child = _spawn(api, tmp_path, "nope")
    try:
        child.expect_exact("Error: model 'nope' not found")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1
