from __future__ import annotations

from pathlib import Path

import pytest

from omx.errors import InvalidDigest, InvalidModelName
from omx.storage import ModelName, blob_filename, parse_digest

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "parts", "display"),
    [
        ("llama3", ("registry.ollama.ai", "library", "llama3", "latest"), "llama3:latest"),
        ("llama3:8b", ("registry.ollama.ai", "library", "llama3", "8b"), "llama3:8b"),
        ("user/my-model:v1.2", ("registry.ollama.ai", "user", "my-model", "v1.2"), "user/my-model:v1.2"),
        ("example.com/ns/m:t", ("example.com", "ns", "m", "t"), "example.com/ns/m:t"),
        ("localhost:5000/ns/m", ("localhost:5000", "ns", "m", "latest"), "localhost:5000/ns/m:latest"),
        ("https://example.com/ns/m:t", ("example.com", "ns", "m", "t"), "example.com/ns/m:t"),
        ("Gemma3:270M", ("registry.ollama.ai", "library", "Gemma3", "270M"), "Gemma3:270M"),
        ("_x/y_z:_1", ("registry.ollama.ai", "_x", "y_z", "_1"), "_x/y_z:_1"),
        ("qwen2.5:0.5b", ("registry.ollama.ai", "library", "qwen2.5", "0.5b"), "qwen2.5:0.5b"),
    ],
)
def test_parse_valid(text: str, parts: tuple[str, str, str, str], display: str) -> None:
    n = ModelName.parse(text)
    assert n.parts == parts
    assert n.display == display
    assert ModelName.parse(n.full) == n


@pytest.mark.parametrize(
    "text",
    [
        "", "  ", "../etc/passwd", "..", "a/../b", "ns/..:latest", "m:..", "/abs/model", "a/b/c/d",
        "ns\\m", "m\x00", "m:", ":tag", "ns/:t", "/m", "-model", "m:-t", "my model", "ns.x/m",
        "a" * 81, "m:" + "t" * 81, "m@sha256:" + HEX, "m:t:u", "m/", "host//m",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


def test_invalid_message_is_clear() -> None:
    with pytest.raises(InvalidModelName, match="'..'"):
        ModelName.parse("ns/..")
    with pytest.raises(InvalidModelName, match="empty"):
        ModelName.parse("")


def test_defaults_are_configurable() -> None:
    n = ModelName.parse("m", default_host="reg.local:5000", default_namespace="team")
    assert n.parts == ("reg.local:5000", "team", "m", "latest")
    assert n.display == "reg.local:5000/team/m:latest"


def test_case_insensitive_key_and_manifest_path(tmp_path: Path) -> None:
    a, b = ModelName.parse("Llama3:Latest"), ModelName.parse("llama3")
    assert a != b and a.same_as(b) and a.key == b.key
    p = b.manifest_path(tmp_path)
    assert p == tmp_path / "manifests" / "registry.ollama.ai" / "library" / "llama3" / "latest"
    assert p.resolve().is_relative_to(tmp_path.resolve())


def test_parse_digest_forms() -> None:
    assert parse_digest("sha256:" + HEX) == "sha256:" + HEX
    assert parse_digest("sha256-" + HEX) == "sha256:" + HEX
    assert blob_filename(parse_digest("sha256:" + HEX)) == "sha256-" + HEX


@pytest.mark.parametrize(
    "text", ["", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + HEX, HEX, "sha256:" + HEX + "/..",
             "sha256/" + HEX, "sha256:" + "g" * 64],
)
def test_parse_digest_invalid(text: str) -> None:
    with pytest.raises(InvalidDigest, match="invalid digest"):
        parse_digest(text)
