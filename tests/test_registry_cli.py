"""``omx pull``/``push``/``proxy`` against a real HTTP server, and the progress view through rich's capture."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from omx.cli.pull import ProgressView, register
from omx.storage.manifests import Manifest
from tests.support.registry_fixtures import make_layers
from tests.support.registry_node import api_node
from tests.support.registry_server import RegistryServer


@click.group()
@click.option("--host")
@click.pass_context
def root(ctx: click.Context, host: str | None) -> None:
    ctx.ensure_object(dict)
    ctx.obj["host"] = host


register(root)


@pytest.fixture
async def server() -> AsyncIterator[RegistryServer]:
    srv = await RegistryServer().start()
    yield srv
    await srv.stop()


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(root, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_progress_view_draws_a_bar_per_layer_with_rate_and_eta() -> None:
    out = Console(record=True, force_terminal=True, width=120, color_system=None)
    digest_a, digest_b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    clock = [100.0]
    with ProgressView(out, get_time=lambda: clock[0]) as view:
        view.update({"status": "pulling manifest"})
        view.update({"status": f"pulling {digest_a[7:19]}", "digest": digest_a, "total": 2_000_000})
        for done in (500_000, 1_000_000):
            clock[0] += 1.0
            view.update({"status": f"pulling {digest_a[7:19]}", "digest": digest_a, "total": 2_000_000,
                         "completed": done})
        view.update({"status": f"pulling {digest_b[7:19]}", "digest": digest_b, "total": 500,
                     "completed": 500})
        view.update({"status": "verifying sha256 digest"})
        view.update({"status": "success"})
    text = out.export_text()
    assert "pulling manifest" in text and "success" in text
    final = text.splitlines()
    bar_a = next(line for line in reversed(final) if "pulling aaaaaaaaaaaa" in line)
    bar_b = next(line for line in reversed(final) if "pulling bbbbbbbbbbbb" in line)
    assert re.search(r"1\.0/2\.0 MB", bar_a)
    assert "500.0 kB/s" in bar_a  # rate: 500 kB per (injected) second
    assert "0:00:02" in bar_a  # time remaining for the last 1 MB at that rate
    assert "500/500 bytes" in bar_b


async def test_cli_pull_proxy_list_and_push(server: RegistryServer, tmp_path: Path) -> None:
    config, layers = make_layers()
    manifest = Manifest.from_bytes(server.add_model("library/tiny", "latest", config, layers))
    target = await RegistryServer(host="127.0.0.4").start()
    try:
        async with api_node(tmp_path, server.netloc) as node:
            code, out = await asyncio.to_thread(_invoke, "--host", node.url, "pull", "tiny")
            assert code == 0, out
            assert "pulling manifest" in out and "success" in out
            assert f"pulling {manifest.layers[0].digest[7:19]}" in out
            code, out = await asyncio.to_thread(_invoke, "--host", node.url, "proxy", "list")
            assert code == 0, out
            row = next(line for line in out.splitlines() if "library/tiny:latest" in line)
            assert "✅ Ready" in row and "MB" in row
            code, out = await asyncio.to_thread(_invoke, "--host", node.url, "proxy", "list", "--json")
            rows = json.loads(out)["models"]
            assert rows == [{"name": f"{server.netloc}/library/tiny:latest", "size": manifest.total_size,
                             "status": "✅ Ready"}]
            code, out = await asyncio.to_thread(_invoke, "--host", node.url, "proxy", "pull", "absent")
            assert code == 1 and "Error:" in out and "not found" in out
            await asyncio.to_thread(node.store.copy_sync, f"{server.netloc}/library/tiny:latest",
                                    f"{target.netloc}/library/tiny:latest")
            code, out = await asyncio.to_thread(_invoke, "--host", node.url, "push", "--insecure",
                                                f"{target.netloc}/library/tiny")
            assert code == 0, out
            assert "pushing manifest" in out and "success" in out
    finally:
        await target.stop()
    assert set(target.blobs) == set(manifest.blobs)
