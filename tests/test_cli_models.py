"""CLI model commands against a FAKE Ollama API (formatting and request flow only)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from omx.cli.main import cli
from tests.support.fake_ollama_api import FakeOllamaApi

DIGEST = "sha256:" + "ab12cd34ef56" + "0" * 52


def _iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllamaApi]:
    monkeypatch.setenv("OMX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OMX_HOST", raising=False)
    fake = FakeOllamaApi(
        models=[{"name": "gemma3:270m", "model": "gemma3:270m", "digest": DIGEST, "size": 253_000_000,
                 "modified_at": _iso(-timedelta(minutes=2, seconds=5))}],
        running=[{"name": "gemma3:270m", "model": "gemma3:270m", "digest": DIGEST, "size": 300_000_000,
                  "size_vram": 0, "expires_at": _iso(timedelta(minutes=4, seconds=30))}],
        show={"gemma3:270m": {
            "modelfile": "FROM /blobs/sha256-x\n", "parameters": 'stop "<end_of_turn>"',
            "template": "{{ .Prompt }}", "license": "Gemma Terms",
            "details": {"parameter_size": "268.10M", "quantization_level": "Q4_K_M"},
            "model_info": {"general.architecture": "gemma3", "gemma3.context_length": 32768,
                           "gemma3.embedding_length": 640},
            "capabilities": ["completion"]}},
    ).start()
    monkeypatch.setenv("OMX_HOST", fake.url)
    yield fake
    fake.stop()


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_table(api: FakeOllamaApi) -> None:
    for command in ("list", "ls"):
        result = invoke(command)
        assert result.exit_code == 0, result.output
        header, row = result.stdout.splitlines()[:2]
        assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
        assert row.split() == ["gemma3:270m", "ab12cd34ef56", "253", "MB", "2", "minutes", "ago"]


def test_list_json_is_raw_api_json(api: FakeOllamaApi) -> None:
    result = invoke("list", "--json")
    assert json.loads(result.stdout) == {"models": api.models}


def test_ps_table(api: FakeOllamaApi) -> None:
    result = invoke("ps")
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    assert "100% CPU" in row and "4 minutes from now" in row and "300 MB" in row
    api.running[0]["expires_at"] = _iso(-timedelta(seconds=5))
    assert "Stopping..." in invoke("ps").stdout
    api.running[0]["expires_at"] = "2318-01-01T00:00:00Z"
    assert "Forever" in invoke("ps").stdout
    assert json.loads(invoke("ps", "--json").stdout) == {"models": api.running}


def test_ps_names_the_node_of_each_model_when_a_cluster_node_answers(api: FakeOllamaApi) -> None:
    api.running.append({**api.running[0], "node": "omx-b"})
    api.running[0]["node"] = "omx-a"
    lines = invoke("ps").stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL", "NODE"]
    assert lines[1].split()[-1] == "omx-a" and lines[2].split()[-1] == "omx-b"


def test_show_sections_and_flags(api: FakeOllamaApi) -> None:
    result = invoke("show", "gemma3:270m")
    assert result.exit_code == 0
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "Model" in lines and "Capabilities" in lines and "Parameters" in lines and "License" in lines
    assert "architecture        gemma3".split() == next(ln for ln in lines if ln.startswith("architecture")).split()
    assert "context length    32768".split() == next(ln for ln in lines if ln.startswith("context")).split()
    assert "quantization    Q4_K_M".split() == next(ln for ln in lines if ln.startswith("quantization")).split()
    assert invoke("show", "gemma3:270m", "--template").stdout == "{{ .Prompt }}\n"
    assert invoke("show", "gemma3:270m", "--modelfile").stdout == "FROM /blobs/sha256-x\n"
    assert invoke("show", "gemma3:270m", "--system").stdout == "No system message was specified for this model.\n"
    assert json.loads(invoke("show", "gemma3:270m", "--json").stdout)["capabilities"] == ["completion"]
    assert api.bodies("/api/show")[0] == {"model": "gemma3:270m"}


def test_api_error_is_one_line_nonzero(api: FakeOllamaApi) -> None:
    result = invoke("show", "nope")
    assert result.exit_code == 1
    assert result.stderr == "Error: model 'nope' not found\n"
    assert result.stdout == ""


def test_rm_and_cp(api: FakeOllamaApi) -> None:
    result = invoke("cp", "gemma3:270m", "mine")
    assert (result.exit_code, result.stdout) == (0, "copied 'gemma3:270m' to 'mine'\n")
    assert api.bodies("/api/copy") == [{"source": "gemma3:270m", "destination": "mine"}]
    result = invoke("rm", "gemma3:270m")
    assert (result.exit_code, result.stdout) == (0, "deleted 'gemma3:270m'\n")
    result = invoke("rm", "gemma3:270m")
    assert result.exit_code == 1 and "Error: model 'gemma3:270m' not found" in result.stderr


def test_version_shows_node_version(api: FakeOllamaApi) -> None:
    result = invoke("version")
    assert result.stdout.splitlines() == ["omx version is 0.1.0", "node version is 9.9.9"]
    assert invoke("--version").stdout == "omx version is 0.1.0\n"


def test_create_uploads_missing_blob_then_creates(api: FakeOllamaApi, tmp_path: Path) -> None:
    weights = tmp_path / "models" / "tiny.gguf"
    weights.parent.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 64
    weights.write_bytes(payload)
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text('FROM ./models/tiny.gguf\nPARAMETER temperature 0.5\nPARAMETER stop "<|end|>"\n'
                         'SYSTEM """You are terse."""\nTEMPLATE {{ .Prompt }}\nLICENSE MIT\n'
                         "MESSAGE user hi\nMESSAGE assistant hello\n")
    result = invoke("create", "tiny", "-f", str(modelfile))
    assert result.exit_code == 0, result.output
    flow = [(r.method, r.path) for r in api.requests]
    assert flow == [("HEAD", f"/api/blobs/{digest}"), ("POST", f"/api/blobs/{digest}"), ("POST", "/api/create")]
    assert api.requests[1].body == payload
    assert api.bodies("/api/create")[0] == {
        "model": "tiny", "files": {"tiny.gguf": digest}, "template": "{{ .Prompt }}",
        "system": "You are terse.", "parameters": {"temperature": 0.5, "stop": ["<|end|>"]}, "license": "MIT",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    assert "success" in result.stderr
    # Second time the node has the blob: HEAD answers 200 and nothing is uploaded again.
    api.requests.clear()
    assert invoke("create", "tiny2", "-f", str(modelfile)).exit_code == 0
    assert [(r.method, r.path) for r in api.requests] == [("HEAD", f"/api/blobs/{digest}"),
                                                        ("POST", "/api/create")]


def test_create_from_model_name(api: FakeOllamaApi, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text("FROM gemma3:270m\nSYSTEM be nice\n")
    result = CliRunner().invoke(cli, ["create", "nice", "-f", str(tmp_path / "Modelfile")])
    assert result.exit_code == 0, result.output
    assert api.bodies("/api/create") == [{"model": "nice", "from": "gemma3:270m", "system": "be nice"}]


def test_create_bad_modelfile_names_line(api: FakeOllamaApi, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text("FROM x\nPARAMETER temperature hot\n")
    result = invoke("create", "bad", "-f", str(tmp_path / "Modelfile"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: modelfile line 2")
    assert api.requests == []


def test_node_not_running_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OMX_HOME", str(tmp_path))
    monkeypatch.setenv("OMX_HOST", f"127.0.0.1:{port}")
    for args in (["list"], ["ps"], ["show", "m"], ["run", "m", "hi"], ["rm", "m"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, args
        assert result.stderr == (f"omx: no node is running at http://127.0.0.1:{port} "
                                 "(start one with 'omx start')\n")
        assert "Traceback" not in result.output
