"""``omx create NAME -f Modelfile``: upload local weights as blobs, then create, as Ollama's CLI does.

The node never reads a path named by the client: every FROM/ADAPTER line that
names a local file (or a folder of weights) is hashed here, offered to
``HEAD /api/blobs/sha256:<hex>`` and uploaded with ``POST`` when the node lacks it;
``/api/create`` then gets ``files``/``adapters`` as ``{name: digest}``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from omx.cli.client import CliFailure, NodeClient, client_for
from omx.cli.output import console
from omx.storage.modelfile import Modelfile, ModelfileError, parse_modelfile

__all__ = ["LocalFile", "build_create_request", "create_cmd", "local_files", "sha256_file"]

_READ_SIZE = 1 << 20
# The files Ollama's CLI takes from a weights folder.
_FOLDER_PATTERNS = ("*.gguf", "*.safetensors", "*.json", "tokenizer.model", "*.bin", "*.pth")


@dataclass(frozen=True)
class LocalFile:
    """A file to upload, under the name the node will know it by."""

    name: str
    path: Path


def resolve_local(value: str, base: Path) -> Path | None:
    """The local file or folder a FROM/ADAPTER value names, or None if it names a model."""
    if value.startswith("@"):
        return None
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    return candidate if candidate.exists() else None


def local_files(path: Path) -> list[LocalFile]:
    """One file, or the weight files of a folder (names relative to it)."""
    if path.is_file():
        return [LocalFile(path.name, path)]
    found: dict[Path, None] = {}
    for pattern in _FOLDER_PATTERNS:
        for item in sorted(path.rglob(pattern)):
            if item.is_file():
                found[item] = None
    if not found:
        raise CliFailure(f"Error: no model files found in {path}")
    return [LocalFile(item.relative_to(path).as_posix(), item) for item in found]


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(_READ_SIZE):
            digest.update(piece)
            if on_bytes:
                on_bytes(len(piece))
    return "sha256:" + digest.hexdigest()


def _read_chunks(path: Path, on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while piece := handle.read(_READ_SIZE):
            on_bytes(len(piece))
            yield piece


def build_create_request(
    name: str,
    modelfile: Modelfile,
    files: dict[str, str] | None,
    adapters: dict[str, str] | None,
) -> dict[str, Any]:
    """The ``/api/create`` body (pure): ``files`` when FROM was local, else ``from``."""
    body: dict[str, Any] = {"model": name}
    if files:
        body["files"] = files
    else:
        body["from"] = modelfile.from_
    if adapters:
        body["adapters"] = adapters
    if modelfile.template is not None:
        body["template"] = modelfile.template
    if modelfile.system is not None:
        body["system"] = modelfile.system
    if modelfile.parameters:
        body["parameters"] = dict(modelfile.parameters)
    if modelfile.license:
        body["license"] = modelfile.license[0] if len(modelfile.license) == 1 else list(modelfile.license)
    if modelfile.messages:
        body["messages"] = [dict(m) for m in modelfile.messages]
    return body


def _upload_all(client: NodeClient, entries: list[LocalFile]) -> dict[str, str]:
    """Hash every file, upload the ones the node lacks; returns ``{name: digest}``."""
    digests: dict[str, str] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console(err=True), transient=False) as progress:
        for entry in entries:
            size = entry.path.stat().st_size
            task = progress.add_task(f"hashing {entry.name}", total=size)
            digest = sha256_file(entry.path, functools.partial(progress.advance, task))
            digests[entry.name] = digest
            if client.head_status(f"/api/blobs/{digest}") == 200:
                progress.update(task, description=f"using existing {entry.name}")
                continue
            upload = progress.add_task(f"copying {entry.name}", total=size)
            body = _read_chunks(entry.path, functools.partial(progress.advance, upload))
            client.upload(f"/api/blobs/{digest}", body, size)
    return digests


@click.command("create")
@click.argument("name")
@click.option(
    "-f", "--file", "modelfile_path", type=click.Path(dir_okay=False, path_type=Path),
    default=Path("Modelfile"), show_default=True, help="Path to the Modelfile.",
)
@click.pass_context
def create_cmd(ctx: click.Context, name: str, modelfile_path: Path) -> None:
    """Create a model from a Modelfile, uploading local weights to the node."""
    try:
        text = modelfile_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliFailure(f"Error: cannot read {modelfile_path}: {exc.strerror}") from exc
    try:
        modelfile = parse_modelfile(text)
    except ModelfileError as exc:
        raise CliFailure(f"Error: {exc.message}") from exc
    base = modelfile_path.expanduser().resolve().parent
    with client_for(ctx) as client:
        files = adapters = None
        source = resolve_local(modelfile.from_ or "", base)
        if source is not None:
            files = _upload_all(client, local_files(source))
        adapter_files: list[LocalFile] = []
        for value in modelfile.adapters:
            path = resolve_local(value, base)
            if path is None:
                raise CliFailure(f"Error: adapter {value!r} is not a local file")
            adapter_files += local_files(path)
        if adapter_files:
            adapters = _upload_all(client, adapter_files)
        body = build_create_request(name, modelfile, files, adapters)
        last = None
        for item in client.stream("POST", "/api/create", body):
            status = str(item.get("status") or "")
            if status and status != last:
                click.echo(status, err=True)
                last = status
    if last != "success":
        raise CliFailure("Error: the node ended the create stream without success")
