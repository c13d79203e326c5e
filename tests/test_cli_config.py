"""``omx config init|show|validate``: every profile loads back, overwrite refused, bad keys exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from omx.cli.config_template import PROFILES, SECTIONS
from omx.cli.main import cli
from omx.runtime.config import Settings, load_settings


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMX_HOME", str(tmp_path / "home"))
    for key in [k for k in os.environ if k.startswith("OMX_") and "__" in k]:
        monkeypatch.delenv(key)
    return tmp_path / "home"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_template_documents_every_setting() -> None:
    documented = {f"{section}.{key}" for section, _, keys in SECTIONS for key, _, _ in keys}
    assert documented == _keys(Settings)
    for profile in PROFILES:
        assert set(PROFILES[profile]) <= documented, profile


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_init_each_profile_loads_back(profile: str, home: Path) -> None:
    result = CliRunner().invoke(cli, ["config", "init", "--profile", profile])
    assert result.exit_code == 0, result.output
    path = home / "config.yaml"
    text = path.read_text()
    assert (path.stat().st_mode & 0o777) == 0o600
    settings = load_settings(path)
    for section, _, keys in SECTIONS:
        for key, _, comment in keys:
            assert f"  # {comment}\n" in text
            assert f"\n  {key}:" in text
        assert f"\n{section}:\n" in text
    assert CliRunner().invoke(cli, ["config", "validate"]).exit_code == 0
    if profile == "edge":
        assert settings.engine.max_loaded_models == 1 and settings.engine.num_parallel == 1
        assert settings.models.max_cache_size == 2 * 10**9
    if profile == "gpu":
        assert settings.engine.num_ctx > Settings().engine.num_ctx
        assert settings.engine.num_parallel > 1
    if profile == "production":
        assert settings.api.host == "0.0.0.0" and settings.replication.factor == 3
        assert settings.models.auto_cleanup is True
        assert "# production: Listens on every interface" in text
    if profile == "default":
        assert settings.model_dump() == Settings().model_dump()


def test_init_refuses_overwrite_without_force(home: Path) -> None:
    assert CliRunner().invoke(cli, ["config", "init"]).exit_code == 0
    (home / "config.yaml").write_text("api:\n  port: 9999\n")
    result = CliRunner().invoke(cli, ["config", "init", "--profile", "gpu"])
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (home / "config.yaml").read_text() == "api:\n  port: 9999\n"
    assert CliRunner().invoke(cli, ["config", "init", "--profile", "gpu", "--force"]).exit_code == 0
    assert load_settings().engine.num_parallel == 4


def test_init_path_option(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "edge.yaml"
    assert CliRunner().invoke(cli, ["config", "init", "--profile", "edge", "--path", str(target)]).exit_code == 0
    assert load_settings(target).engine.max_loaded_models == 1


def test_validate_bad_key_exits_2_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  num_parallel: 0\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    assert "engine.num_parallel" in result.stderr and result.stderr.count("\n") == 1
    bad.write_text("api:\n  colour: blue\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(bad)])
    assert result.exit_code == 2 and "api.colour" in result.stderr
    result = CliRunner().invoke(cli, ["config", "validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_show_effective_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    CliRunner().invoke(cli, ["config", "init", "--profile", "edge"])
    monkeypatch.setenv("OMX_API__PORT", "9123")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["api"]["port"] == 9123 and shown["engine"]["max_loaded_models"] == 1
    as_json = json.loads(CliRunner().invoke(cli, ["config", "show", "--json"]).stdout)
    assert as_json == shown


def test_show_bad_config_exits_2(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.yaml").write_text("replication:\n  factor: 99\n")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 2 and "replication.factor" in result.stderr


@pytest.mark.parametrize("text,key", [
    ("engine:\n  max_queue: 0\n", "engine.max_queue"),
    ("engine:\n  max_loaded_models: 0\n", "engine.max_loaded_models"),
    ("engine:\n  num_thread: 0\n", "engine.num_thread"),
    ("engine:\n  num_ctx: 32\n", "engine.num_ctx"),
    ("engine:\n  num_ctx: 100000000000\n", "engine.num_ctx"),
    ("engine:\n  keep_alive: nan\n", "engine.keep_alive"),
    ("models:\n  download_timeout: 0\n", "models.download_timeout"),
    ("models:\n  download_timeout: -5m\n", "models.download_timeout"),
    ("models:\n  download_timeout: inf\n", "models.download_timeout"),
    ("models:\n  concurrency: 0\n", "models.concurrency"),
    ("models:\n  chunk_size: 1KB\n", "models.chunk_size"),
    ("models:\n  max_cache_size: -1\n", "models.max_cache_size"),
    ("api:\n  port: 70000\n", "api.port"),
    ("p2p:\n  port: -1\n", "p2p.port"),
    ("replication:\n  factor: 0\n", "replication.factor"),
])
def test_out_of_bounds_values_exit_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(cli, ["config", "validate", str(bad)])
    assert result.exit_code == 2, result.output
    assert key in result.stderr and "Traceback" not in result.stderr


def test_start_with_a_queue_the_scheduler_rejects_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  max_queue: 0\n")
    result = CliRunner().invoke(cli, ["start", "--config", str(bad)])
    assert result.exit_code == 2 and "engine.max_queue" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setenv("OMX_ENGINE__MAX_QUEUE", "0")
    result = CliRunner().invoke(cli, ["start"])
    assert result.exit_code == 2 and "engine.max_queue" in result.stderr


def test_the_smallest_accepted_engine_values_build_a_scheduler(tmp_path: Path) -> None:
    from omx.runtime.engine._fake import FakeEngine
    from omx.runtime.scheduler import ModelScheduler

    low = tmp_path / "low.yaml"
    low.write_text("engine:\n  max_queue: 1\n  max_loaded_models: 1\n  num_parallel: 1\n  keep_alive: -1\n")
    engine = load_settings(low).engine
    scheduler = ModelScheduler(FakeEngine(), max_loaded_models=engine.max_loaded_models,
                               num_parallel=engine.num_parallel, max_queue=engine.max_queue,
                               default_keep_alive=engine.keep_alive)
    assert scheduler.max_queue == 1
