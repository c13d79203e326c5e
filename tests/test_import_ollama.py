"""``import-ollama``: detection, migration by hard link, coexistence in place, replace.

Every test builds an Ollama store in a temp folder with Ollama's exact layout
(``manifests/registry.ollama.ai/library/<model>/<tag>`` and
``blobs/sha256-<hex>``, digests and sizes that match) and checks afterwards,
by hashing every file, that the Ollama store was left byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from omx.cli.import_ollama import import_ollama_cmd, ollama_url, probe_ollama, register
from omx.errors import NotFound
from omx.runtime.config import load_settings
from omx.storage import ollama_import
from omx.storage.blobs import BlobStore
from omx.storage.manifests import (
    CONFIG_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_TEMPLATE,
)
from omx.storage.names import ModelName
from omx.storage.ollama_import import (
    candidate_stores,
    find_stores,
    migrate,
    migrate_async,
    scan_store,
)
from omx.storage.store import ModelStore
from tests.support.node import start_node
from tests.support.tiny_gguf import write_tiny_llama

TEMPLATE = b"{{ .System }} USER: {{ .Prompt }} ASSISTANT:"
PARAMS = b'{"stop":["USER:"],"temperature":0}'
CHUNK = 64 * 1024


# ------------------------------------------------------------------ fake Ollama store


def _put_blob(store: Path, data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = store / "blobs" / digest.replace(":", "-")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def add_model(store: Path, name: str, layers: list[tuple[str, bytes]], family: str = "llama") -> Path:
    """Write blobs, a config blob and the manifest of ``name`` as Ollama does."""
    descs = [{"mediaType": media, **_put_blob(store, data)} for media, data in layers]
    config = {
        "model_format": "gguf", "model_family": family, "model_families": [family],
        "model_type": "1M", "file_type": "F32", "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }
    config_desc = {"mediaType": CONFIG_MEDIA_TYPE, **_put_blob(store, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config_desc, "layers": descs}
    n = ModelName.parse(name)
    path = store / "manifests" / n.host / n.namespace / n.model / n.tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=3, n_layer=1).read_bytes()


@pytest.fixture
def ollama(tmp_path: Path, gguf_bytes: bytes) -> Path:
    """An Ollama store with a real tiny GGUF model and a namespaced layout-only model."""
    store = tmp_path / "ollama" / "models"
    add_model(store, "tiny:latest", [(MEDIA_MODEL, gguf_bytes), (MEDIA_TEMPLATE, TEMPLATE), (MEDIA_PARAMS, PARAMS)])
    add_model(store, "someone/blobby:v1", [(MEDIA_MODEL, os.urandom(5000)), (MEDIA_TEMPLATE, TEMPLATE)])
    return store


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: relative path -> (sha256, mode)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def blob_path(store: Path, digest: str) -> Path:
    return store / "blobs" / digest.replace(":", "-")


def model_blobs(ollama: Path, name: str) -> list[str]:
    return list(scan_store(ollama).model(name).manifest.blobs)


@pytest.fixture
def env(tmp_path: Path, ollama: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """OMX_HOME, HOME and OLLAMA_MODELS in tmp; OLLAMA_HOST on a port where nothing listens."""
    home = tmp_path / "home"
    home.mkdir()
    values = {
        "OMX_HOME": str(tmp_path / "omx"),
        "HOME": str(home),
        "OLLAMA_MODELS": str(ollama),
        "OLLAMA_HOST": f"127.0.0.1:{_closed_port()}",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for k in list(os.environ):
        if k.startswith("OMX_") and k != "OMX_HOME":
            monkeypatch.delenv(k)
    return values


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def omx_store(env: dict[str, str]) -> Path:
    return Path(env["OMX_HOME"]) / "data" / "models"


def invoke(*args: str, input: str | None = None) -> click.testing.Result:
    return CliRunner().invoke(import_ollama_cmd, list(args), input=input, catch_exceptions=False)


# ------------------------------------------------------------------ discovery


def test_candidates_follow_ollamas_order(tmp_path: Path) -> None:
    found = candidate_stores({"OLLAMA_MODELS": "/srv/models"}, tmp_path)
    assert found == [
        ("OLLAMA_MODELS", Path("/srv/models")),
        ("user", tmp_path / ".ollama" / "models"),
        ("system", Path("/usr/share/ollama/.ollama/models")),
    ]
    assert [o for o, _ in candidate_stores({}, tmp_path)] == ["user", "system"]


def test_find_stores_dedupes_and_checks_source(tmp_path: Path, ollama: Path) -> None:
    home = tmp_path / "h"
    (home / ".ollama").mkdir(parents=True)
    (home / ".ollama" / "models").symlink_to(ollama)
    found = find_stores(env={"OLLAMA_MODELS": str(ollama)}, home=home)
    assert [p for _, p in found if p == ollama.resolve()] == [ollama.resolve()]
    assert found[0] == ("OLLAMA_MODELS", ollama.resolve())
    assert find_stores(ollama) == [("source", ollama.resolve())]
    with pytest.raises(NotFound, match="not an Ollama model store"):
        find_stores(tmp_path / "nothing-here")


def test_scan_lists_models_sizes_and_completeness(ollama: Path, gguf_bytes: bytes) -> None:
    store = scan_store(ollama)
    assert [m.name.display for m in store.models] == ["tiny:latest", "someone/blobby:v1"]
    tiny = store.model("tiny")
    assert tiny.blob_count == 4 and tiny.complete
    config_size = tiny.manifest.config.size
    assert tiny.size == len(gguf_bytes) + len(TEMPLATE) + len(PARAMS) + config_size
    manifest_bytes = tiny.manifest_path.read_bytes()
    assert tiny.digest == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    # The shared template blob counts once in the store's size.
    assert store.size == sum(p.stat().st_size for p in (ollama / "blobs").iterdir())

    blob_path(ollama, str(tiny.manifest.layers[1].digest)).unlink()
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "broken").mkdir()
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest").write_text("{not json")
    again = scan_store(ollama)
    assert not again.model("tiny").complete
    assert again.model("tiny").missing == (tiny.manifest.layers[1].digest,)
    assert len(again.problems) == 1 and "broken" in again.problems[0]


# ------------------------------------------------------------------ migration (library)


def test_migrate_hard_links_verifies_and_indexes(tmp_path: Path, ollama: Path) -> None:
    before = tree(ollama)
    root = tmp_path / "omx"
    blobs = BlobStore(root, chunk_size=CHUNK)
    report = migrate(scan_store(ollama), blobs)
    assert [m.status for m in report.models] == ["imported", "imported"]
    assert report.count("copied") == 0 and report.count("linked") == 6  # 4 + 3 blobs, template shared
    for src in (ollama / "blobs").iterdir():
        dst = root / "blobs" / src.name
        assert os.stat(dst).st_ino == os.stat(src).st_ino
        idx = blobs.stored_index(src.name)
        assert idx is not None and idx.chunk_size == CHUNK and idx.size == src.stat().st_size
    assert sorted(p.name for p in (root / "blobs").iterdir()) == sorted(p.name for p in (ollama / "blobs").iterdir())
    assert all(p.name.startswith("sha256-") and not p.name.endswith(".json") for p in (root / "blobs").iterdir())
    # Manifests keep Ollama's exact bytes, hence its digest.
    for m in scan_store(ollama).models:
        assert m.name.manifest_path(root).read_bytes() == m.manifest_path.read_bytes()

    ms = ModelStore(root, chunk_size=CHUNK)
    listed = {e.name: e for e in ms.list_models_sync()}
    assert set(listed) == {"tiny:latest", "someone/blobby:v1"}
    assert listed["tiny:latest"].digest == scan_store(ollama).model("tiny").digest
    resolved = ms.resolve_sync("tiny")
    assert resolved.template == TEMPLATE.decode()
    assert resolved.params == {"stop": ["USER:"], "temperature": 0}
    assert resolved.gguf is not None and resolved.model_path.parent == root / "blobs"
    assert ms.show_sync("tiny")["details"]["family"] == "llama"

    again = migrate(scan_store(ollama), blobs)
    assert [m.status for m in again.models] == ["present", "present"]
    assert tree(ollama) == before


def test_migrate_copies_across_filesystems(
    tmp_path: Path, ollama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*_a: object, **_k: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(ollama_import.os, "link", no_link)
    before = tree(ollama)
    root = tmp_path / "omx"
    report = migrate(scan_store(ollama), BlobStore(root, chunk_size=CHUNK), names=["tiny"])
    assert [m.status for m in report.models] == ["imported"]
    assert report.count("copied") == 4 and report.count("linked") == 0
    for digest in model_blobs(ollama, "tiny"):
        src, dst = blob_path(ollama, digest), blob_path(root, digest)
        assert os.stat(dst).st_ino != os.stat(src).st_ino
        assert dst.read_bytes() == src.read_bytes()
    assert ModelStore(root).resolve_sync("tiny").gguf is not None
    assert tree(ollama) == before


def test_migrate_without_links_when_asked(tmp_path: Path, ollama: Path) -> None:
    report = migrate(scan_store(ollama), BlobStore(tmp_path / "omx", chunk_size=CHUNK), link=False)
    assert report.ok and report.count("linked") == 0 and report.count("copied") == 6


async def test_corrupt_blob_is_reported_and_not_imported(tmp_path: Path, ollama: Path) -> None:
    tiny = scan_store(ollama).model("tiny")
    weights = blob_path(ollama, tiny.manifest.layers[0].digest)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = tree(ollama)

    root = tmp_path / "omx"
    report = await migrate_async(scan_store(ollama), BlobStore(root, chunk_size=CHUNK))
    outcome = {m.name.display: m for m in report.models}
    assert outcome["tiny:latest"].status == "failed"
    assert "corrupt" in (outcome["tiny:latest"].error or "")
    assert outcome["someone/blobby:v1"].status == "imported"
    assert not ModelName.parse("tiny").manifest_path(root).exists()
    # Nothing of the failed model stays, except the template it shares with the imported one.
    shared = set(model_blobs(ollama, "someone/blobby:v1"))
    held = {p.name for p in (root / "blobs").iterdir()}
    assert held == {d.replace(":", "-") for d in shared}
    assert not list((root / "tmp").iterdir())
    assert not (root / "chunks" / (weights.name + ".json")).exists()
    assert tree(ollama) == before


def test_existing_different_model_is_left_alone(tmp_path: Path, ollama: Path) -> None:
    root = tmp_path / "omx"
    mine = root / "manifests" / "registry.ollama.ai" / "library" / "Tiny" / "latest"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b'{"schemaVersion":2}')
    report = migrate(scan_store(ollama), BlobStore(root, chunk_size=CHUNK), names=["tiny"])
    assert report.models[0].status == "conflict"
    assert mine.read_bytes() == b'{"schemaVersion":2}'
    assert not (root / "manifests" / "registry.ollama.ai" / "library" / "tiny").exists()


def test_unknown_model_name(tmp_path: Path, ollama: Path) -> None:
    with pytest.raises(NotFound, match="not found in the Ollama store"):
        migrate(scan_store(ollama), BlobStore(tmp_path / "omx"), names=["nope"])


# ------------------------------------------------------------------ Ollama server


@pytest.mark.parametrize(("value", "url"), [
    ("", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("example.com:9000", "http://example.com:9000"),
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("[::1]:8000", "http://[::1]:8000"),
    (":11500", "http://127.0.0.1:11500"),
])
def test_ollama_url_reads_ollama_host_as_ollama_does(value: str, url: str) -> None:
    assert ollama_url(value) == url


@pytest.fixture
def fake_ollama_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b'{"version":"0.9.6"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=20)


def test_probe_sees_a_listening_server(fake_ollama_server: str) -> None:
    server = probe_ollama(ollama_url(fake_ollama_server))
    assert server.listening and server.version == "0.9.6"
    assert not probe_ollama(f"http://127.0.0.1:{_closed_port()}").listening


# ------------------------------------------------------------------ CLI


def test_register_adds_the_command() -> None:
    group = click.Group("omx")
    register(group)
    assert group.commands["import-ollama"] is import_ollama_cmd


def test_cli_detect(env: dict[str, str], ollama: Path, monkeypatch: pytest.MonkeyPatch,
                    fake_ollama_server: str) -> None:
    before = tree(ollama)
    result = invoke("--mode", "detect", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (store,) = doc["stores"]
    assert store["path"] == str(ollama.resolve()) and store["origin"] == "OLLAMA_MODELS"
    models = {m["name"]: m for m in store["models"]}
    tiny = scan_store(ollama).model("tiny")
    assert models["tiny:latest"]["size"] == tiny.size and models["tiny:latest"]["blobs"] == 4
    assert models["tiny:latest"]["digest"] == tiny.digest and models["tiny:latest"]["complete"]
    assert doc["ollama_server"]["listening"] is False

    monkeypatch.setenv("OLLAMA_HOST", fake_ollama_server)
    human = invoke()
    assert human.exit_code == 0
    assert "tiny:latest" in human.stdout and "someone/blobby:v1" in human.stdout
    assert "listening (version 0.9.6)" in human.stdout
    assert tree(ollama) == before


def test_cli_detect_nothing(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_MODELS")
    result = invoke("--mode", "detect")
    assert result.exit_code == 0 and "No Ollama model store found" in result.stdout
    missing = invoke("--mode", "migrate", "--source", str(tmp_path / "absent"))
    assert missing.exit_code == 1 and "not an Ollama model store" in missing.stderr


def test_cli_migrate(env: dict[str, str], ollama: Path) -> None:
    before = tree(ollama)
    result = invoke("--mode", "migrate", "--json")
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)["reports"]
    assert report["linked"] == 6 and {m["status"] for m in report["models"]} == {"imported"}
    root = omx_store(env)
    for src in (ollama / "blobs").iterdir():
        assert os.stat(root / "blobs" / src.name).st_ino == os.stat(src).st_ino
    assert {e.name for e in ModelStore(root).list_models_sync()} == {"tiny:latest", "someone/blobby:v1"}
    assert tree(ollama) == before


def test_cli_migrate_reports_a_corrupt_blob(env: dict[str, str], ollama: Path) -> None:
    digest = scan_store(ollama).model("someone/blobby:v1").manifest.layers[0].digest
    path = blob_path(ollama, digest)
    path.write_bytes(b"\0" * path.stat().st_size)
    result = invoke("--mode", "migrate", "--source", str(ollama))
    assert result.exit_code == 1
    assert "someone/blobby:v1" in result.stderr and "corrupt" in result.stderr
    names = {e.name for e in ModelStore(omx_store(env)).list_models_sync()}
    assert names == {"tiny:latest"}
    assert not blob_path(omx_store(env), digest).exists()


def test_cli_coexist_serves_in_place(env: dict[str, str], ollama: Path) -> None:
    before = tree(ollama)
    config = Path(env["OMX_HOME"]) / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("api:\n  port: 9999\nmodels:\n  max_cache_size: 5GB\n")
    for _ in range(2):
        result = invoke("--mode", "coexist")
        assert result.exit_code == 0, result.output
    assert "Updated models.extra_stores" in result.stdout
    data = yaml.safe_load(config.read_text())
    assert data["api"] == {"port": 9999} and data["models"]["max_cache_size"] == "5GB"
    assert data["models"]["extra_stores"] == [str(ollama.resolve())]
    settings = load_settings()
    assert settings.models.extra_stores == [ollama.resolve()]

    root = settings.store_path
    ms = ModelStore(root, extra_roots=settings.models.extra_stores)
    listed = {e.name: e for e in ms.list_models_sync()}
    assert set(listed) == {"tiny:latest", "someone/blobby:v1"} and listed["tiny:latest"].read_only
    resolved = ms.resolve_sync("tiny")
    assert resolved.model_path.parent == ollama.resolve() / "blobs"
    assert resolved.gguf is not None
    assert not any((root / "blobs").iterdir())
    assert tree(ollama) == before

    # A real node started on this configuration serves the Ollama model in place.
    node = start_node(Path(env["OMX_HOME"]))
    try:
        with node.client() as http:
            names = [m["name"] for m in http.get("/api/tags").json()["models"]]
            reply = http.post("/api/generate", json={"model": "tiny", "prompt": "hello", "stream": False,
                                                     "options": {"num_predict": 3, "temperature": 0}})
    finally:
        node.stop()
    assert "tiny:latest" in names
    assert reply.status_code == 200 and reply.json()["eval_count"] == 3
    assert not any((root / "blobs").iterdir())
    assert tree(ollama) == before


def test_cli_replace_with_backup_and_preserve(env: dict[str, str], ollama: Path) -> None:
    before = tree(ollama)
    result = invoke("--mode", "replace", "--backup-original", "--preserve-models", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (backup,) = doc["backups"]
    assert Path(backup).parent == Path(env["OMX_HOME"]) / "backups"
    assert tree(Path(backup)) == before
    assert doc["removed"] == []
    assert {e.name for e in ModelStore(omx_store(env)).list_models_sync()} == {"tiny:latest", "someone/blobby:v1"}
    assert tree(ollama) == before


def test_cli_replace_removes_the_original(env: dict[str, str], ollama: Path) -> None:
    contents = {p.name: p.read_bytes() for p in (ollama / "blobs").iterdir()}
    invoke("--mode", "coexist")
    declined = invoke("--mode", "replace", input="n\n")
    assert declined.exit_code == 0 and "Remove 2 migrated models" in declined.stderr
    assert {p.name for p in (ollama / "blobs").iterdir()} == set(contents)

    result = invoke("--mode", "replace", "--yes")
    assert result.exit_code == 0, result.output
    assert not list((ollama / "blobs").iterdir())
    assert not list((ollama / "manifests").rglob("*"))
    root = omx_store(env)
    assert {p.name: p.read_bytes() for p in (root / "blobs").iterdir()} == contents
    assert load_settings().models.extra_stores == []
    ms = ModelStore(root)
    assert ms.resolve_sync("tiny").gguf is not None
    assert {e.name for e in ms.list_models_sync()} == {"tiny:latest", "someone/blobby:v1"}


def test_cli_replace_refuses_while_ollama_runs(
    env: dict[str, str], ollama: Path, monkeypatch: pytest.MonkeyPatch, fake_ollama_server: str
) -> None:
    before = tree(ollama)
    monkeypatch.setenv("OLLAMA_HOST", fake_ollama_server)
    result = invoke("--mode", "replace", "--yes")
    assert result.exit_code == 1 and "stop it before" in result.stderr
    assert tree(ollama) == before
    assert not (omx_store(env) / "manifests").exists()


def test_cli_replace_one_model_keeps_shared_blobs(env: dict[str, str], ollama: Path) -> None:
    result = invoke("--mode", "replace", "--model", "tiny", "--yes")
    assert result.exit_code == 0, result.output
    left = scan_store(ollama)
    assert [m.name.display for m in left.models] == ["someone/blobby:v1"]
    assert left.models[0].complete  # the template it shares with tiny is still there
    tiny_only = set(model_blobs_of(omx_store(env), "tiny")) - set(left.models[0].manifest.blobs)
    assert tiny_only and not any(blob_path(ollama, d).exists() for d in tiny_only)
    assert {e.name for e in ModelStore(omx_store(env)).list_models_sync()} == {"tiny:latest"}


def model_blobs_of(root: Path, name: str) -> list[str]:
    return list(ModelStore(root).resolve_sync(name).manifest.blobs)
