"""``omx cluster init|token|join|leave``: local files for real, the running node FAKE."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from omx.cli.cluster import set_join_seeds
from omx.cli.main import cli
from omx.cli.node import start_overrides
from omx.mesh import ClusterSecret, JoinToken, read_secret, write_secret
from tests.support.fake_ollama_api import FakeOllamaApi


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("OMX_HOME", str(path))
    monkeypatch.delenv("OMX_HOST", raising=False)
    monkeypatch.delenv("OMX_CLUSTER_SECRET", raising=False)
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_init_creates_the_secret_once(home: Path) -> None:
    result = invoke("cluster", "init")
    secret_path = home / "cluster" / "secret"
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"✅ Created cluster secret at {secret_path}"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    first = read_secret(secret_path)
    again = invoke("cluster", "init")
    assert again.exit_code == 1
    assert again.stderr.strip() == (
        f"Error: a cluster secret already exists at {secret_path} (use --force to replace it)")
    assert read_secret(secret_path) == first
    forced = invoke("cluster", "init", "--force")
    assert forced.exit_code == 0 and read_secret(secret_path) != first


def test_token_offline_uses_the_secret_and_advertised_address(home: Path) -> None:
    missing = invoke("cluster", "token")
    assert missing.exit_code == 1 and "omx cluster init" in missing.stderr
    assert invoke("cluster", "init").exit_code == 0
    home.joinpath("config.yaml").write_text("p2p:\n  advertise: 10.1.2.3\n  port: 4100\n")
    result = invoke("cluster", "token")
    assert result.exit_code == 0, result.output
    token = JoinToken.parse(result.stdout.strip())
    assert token.seeds == ("10.1.2.3:4100",)
    assert token.secret == read_secret(home / "cluster" / "secret")
    assert result.stderr == ""


def test_token_offline_warns_about_loopback(home: Path) -> None:
    assert invoke("cluster", "init").exit_code == 0
    result = invoke("cluster", "token")
    assert result.exit_code == 0
    assert JoinToken.parse(result.stdout.strip()).seeds == ("127.0.0.1:4001",)
    assert "loopback" in result.stderr


def test_join_offline_stores_secret_and_seeds_keeping_comments(home: Path) -> None:
    assert invoke("config", "init").exit_code == 0
    secret = ClusterSecret.generate()
    token = JoinToken(seeds=("10.0.0.7:4001", "10.0.0.8:4001"), secret=secret).encode()
    result = invoke("cluster", "join", token)
    assert result.exit_code == 0, result.output
    assert "added 10.0.0.7:4001, 10.0.0.8:4001 to p2p.join" in result.stdout
    assert read_secret(home / "cluster" / "secret") == secret
    text = (home / "config.yaml").read_text()
    assert yaml.safe_load(text)["p2p"]["join"] == ["10.0.0.7:4001", "10.0.0.8:4001"]
    assert "# Gossip membership (a supervised Serf agent)." in text
    assert invoke("config", "validate").exit_code == 0
    # Joining again with the same token is idempotent.
    assert invoke("cluster", "join", token).exit_code == 0
    assert yaml.safe_load((home / "config.yaml").read_text())["p2p"]["join"] == ["10.0.0.7:4001", "10.0.0.8:4001"]


def test_join_offline_refuses_another_clusters_secret(home: Path) -> None:
    write_secret(home / "cluster" / "secret", ClusterSecret.generate())
    other = ClusterSecret.generate()
    token = JoinToken(seeds=("10.0.0.9:4001",), secret=other).encode()
    refused = invoke("cluster", "join", token)
    assert refused.exit_code == 1 and "another cluster's secret" in refused.stderr
    assert not (home / "config.yaml").exists()
    assert invoke("cluster", "join", "--force", token).exit_code == 0
    assert read_secret(home / "cluster" / "secret") == other


def test_join_rejects_a_bad_token(home: Path) -> None:
    result = invoke("cluster", "join", "omx1.@@@")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: join token is corrupted (bad base64url or JSON); copy it again"


def test_set_join_seeds_layouts() -> None:
    assert yaml.safe_load(set_join_seeds("", ["a:1"])) == {"p2p": {"join": ["a:1"]}}
    flow = "api:\n  port: 1\np2p:\n  port: 2 # gossip\n  join: []\nweb:\n  port: 3\n"
    out = set_join_seeds(flow, ["a:1", "b:2"])
    assert yaml.safe_load(out) == {"api": {"port": 1}, "p2p": {"port": 2, "join": ["a:1", "b:2"]}, "web": {"port": 3}}
    assert "# gossip" in out
    block = "p2p:\n  join:\n    - old:1\n  port: 2\n"
    assert yaml.safe_load(set_join_seeds(block, ["old:1", "new:2"])) == {"p2p": {"join": ["old:1", "new:2"],
                                                                                 "port": 2}}
    no_key = "p2p:\n  port: 2\n"
    assert yaml.safe_load(set_join_seeds(no_key, ["x:1"])) == {"p2p": {"join": ["x:1"], "port": 2}}


def test_start_maps_join_and_token_flags() -> None:
    assert start_overrides(None, None, None, None, ("10.0.0.1:4001",), "omx1.abc") == {
        "p2p": {"join": ["10.0.0.1:4001"]}, "cluster": {"token": "omx1.abc"}}


class _ClusterAdminApi(FakeOllamaApi):
    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/api/cluster/token":
            return 200, {"token": "omx1.from-the-node"}
        if path == "/api/cluster/join":
            if not str(body.get("token", "")).startswith("omx1."):
                return 400, {"error": "not an omx join token (expected it to start with 'omx1.')"}
            return 200, {"joined": 2}
        if path == "/api/cluster/leave":
            return 200, {"left": True}
        return super().answer(method, path, body)


@pytest.fixture
def node_api(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_ClusterAdminApi]:
    fake = _ClusterAdminApi().start()
    monkeypatch.setenv("OMX_HOST", fake.url)
    yield fake
    fake.stop()


def test_commands_ask_the_running_node(node_api: _ClusterAdminApi, home: Path) -> None:
    token = invoke("cluster", "token")
    assert token.exit_code == 0 and token.stdout == "omx1.from-the-node\n"
    joined = invoke("cluster", "join", "omx1.sometoken")
    assert joined.exit_code == 0 and joined.stdout == "✅ Joined the cluster (2 nodes contacted)\n"
    assert node_api.bodies("/api/cluster/join") == [{"token": "omx1.sometoken"}]
    bad = invoke("cluster", "join", "nonsense")
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "Error: not an omx join token (expected it to start with 'omx1.')"
    left = invoke("cluster", "leave")
    assert left.exit_code == 0 and left.stdout.startswith("✅ Left the cluster")
    assert [r.method for r in node_api.requests if r.path == "/api/cluster/leave"] == ["POST"]
    # Nothing was written locally: the node owns its secret and config.
    assert not (home / "cluster").exists() and not (home / "config.yaml").exists()


def test_leave_without_a_node(home: Path) -> None:
    result = invoke("cluster", "leave")
    assert result.exit_code == 1
    assert result.stderr.strip() == "omx: no node is running (start one with 'omx start')"
