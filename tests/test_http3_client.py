"""A real HTTP/3 client omx does not write (niquests, HTTP/1.1 and HTTP/2 disabled) against a running node.

niquests lives in ``.venv-h3`` (``scripts/setup.sh --test``): its urllib3-future would replace the
urllib3 of the project's own environment. The client runs as a subprocess
(:mod:`tests.support.niquests_h3`) trusting the node's ``ca.crt``, or another cluster's CA.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from omx.mesh import ClusterSecret
from omx.runtime.tls import ensure_tls
from tests.support.node import NodeProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[1]
H3_PYTHON = ROOT / ".venv-h3" / "bin" / "python"
SCRIPT = ROOT / "tests" / "support" / "niquests_h3.py"
HTTP3 = 30
"""niquests' ``http_version`` for HTTP/3."""


@pytest.fixture(scope="module")
def h3_python() -> Path:
    if not H3_PYTHON.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(".venv-h3 (niquests) is installed by scripts/setup.sh --test")
        pytest.skip(".venv-h3 with niquests is missing (scripts/setup.sh --test installs it)")
    return H3_PYTHON


def niquests(python: Path, node: NodeProcess, ca: Path, *commands: dict[str, Any]) -> list[dict[str, Any]]:
    base = f"https://127.0.0.1:{node.info['h3_port']}"
    done = subprocess.run([str(python), str(SCRIPT), base, str(ca)],
                          input="".join(json.dumps(c) + "\n" for c in commands), capture_output=True, text=True,
                          timeout=150, env={"PATH": os.environ.get("PATH", "")}, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_niquests_speaks_http3_to_the_node(h3_python: Path, node: NodeProcess, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    gen = {"model": "tiny", "prompt": "hello", "stream": True, "options": {"num_predict": 8}}
    version, tags, stream, upload = niquests(
        h3_python, node, node.home / "tls" / "ca.crt",
        {"get": "/api/version"}, {"get": "/api/tags"}, {"stream": "/api/generate", "body": gen},
        {"upload": f"/api/blobs/{digest}", "file": str(blob)})
    for answer in (version, tags, stream, upload):
        assert "error" not in answer, answer
        assert answer["http_version"] == HTTP3
    assert version["status"] == 200 and version["json"]["version"]
    assert "tiny:latest" in [m["name"] for m in tags["json"]["models"]]
    lines = stream["lines"]
    assert stream["status"] == 200 and len(lines) >= 2
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(line.get("response", "") for line in lines)
    assert upload["status"] == 201
    assert httpx.head(node.url + f"/api/blobs/{digest}").status_code == 200


def test_niquests_trusting_another_ca_is_refused(h3_python: Path, node: NodeProcess, tmp_path: Path) -> None:
    ensure_tls(tmp_path, ClusterSecret.generate(), "omx-other", ["127.0.0.1"])
    refused, = niquests(h3_python, node, tmp_path / "tls" / "ca.crt", {"get": "/api/version"})
    assert "error" in refused and "status" not in refused
    ok, = niquests(h3_python, node, node.home / "tls" / "ca.crt", {"get": "/api/version"})
    assert ok["status"] == 200 and ok["http_version"] == HTTP3


def test_http1_answers_point_at_http3(node: NodeProcess) -> None:
    r = httpx.get(node.url + "/api/tags")
    assert r.http_version == "HTTP/1.1"
    assert r.headers["alt-svc"] == f'h3=":{node.info["h3_port"]}"; ma=86400'
