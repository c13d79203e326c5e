"""Finding Ollama model stores and reading what they hold, without writing to them.

Ollama keeps models in ``$OLLAMA_MODELS``, else ``~/.ollama/models`` (and, for
the Linux service, ``/usr/share/ollama/.ollama/models``), laid out as
``manifests/<host>/<namespace>/<model>/<tag>`` and ``blobs/sha256-<hex>``. A
scan reads every manifest and stats the blobs it names; nothing is hashed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omx.errors import IntegrityError, InvalidModelName, NotFound
from omx.types import BlobDigest

from .manifests import Manifest, manifest_digest
from .names import ModelName, blob_filename

__all__ = [
    "OllamaModel",
    "OllamaStore",
    "candidate_stores",
    "find_stores",
    "is_ollama_store",
    "scan_store",
]


def candidate_stores(
    env: Mapping[str, str] | None = None, home: Path | None = None
) -> list[tuple[str, Path]]:
    """Where Ollama keeps models, in Ollama's own order: ``(origin, path)`` pairs, not checked.

    ``$OLLAMA_MODELS`` first, then the user's ``~/.ollama/models``, then the
    Linux service account's ``/usr/share/ollama/.ollama/models``.
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    found: list[tuple[str, Path]] = []
    if env.get("OLLAMA_MODELS"):
        found.append(("OLLAMA_MODELS", Path(env["OLLAMA_MODELS"]).expanduser()))
    found.append(("user", home / ".ollama" / "models"))
    found.append(("system", Path("/usr/share/ollama/.ollama/models")))
    return found


def is_ollama_store(path: Path) -> bool:
    """Whether ``path`` looks like an Ollama store (it has ``manifests/`` or ``blobs/``)."""
    try:
        return (path / "manifests").is_dir() or (path / "blobs").is_dir()
    except OSError:
        return False


def find_stores(
    source: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> list[tuple[str, Path]]:
    """The Ollama stores present: ``source`` alone when given, else every candidate that exists.

    Paths are resolved and deduplicated (``$OLLAMA_MODELS`` often names the
    default folder). A ``source`` that is not an Ollama store raises
    :class:`NotFound`.
    """
    if source is not None:
        path = Path(source).expanduser()
        if not is_ollama_store(path):
            raise NotFound(f"{path} is not an Ollama model store (no manifests/ or blobs/ folder)")
        return [("source", path.resolve())]
    seen: set[Path] = set()
    stores: list[tuple[str, Path]] = []
    for origin, path in candidate_stores(env, home):
        if not is_ollama_store(path):
            continue
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            stores.append((origin, real))
    return stores


@dataclass(frozen=True)
class OllamaModel:
    """One tagged model of an Ollama store, as found on disk (nothing hashed)."""

    name: ModelName
    manifest_path: Path
    manifest: Manifest
    digest: BlobDigest
    """sha256 of the manifest bytes: the id ``ollama list`` shows."""
    modified: float
    missing: tuple[BlobDigest, ...] = ()
    """Blobs absent from the store, or present with a size other than the manifest's."""

    @property
    def size(self) -> int:
        return self.manifest.total_size

    @property
    def blob_count(self) -> int:
        return len(self.manifest.blobs)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class OllamaStore:
    """An Ollama store and the models in it. ``problems`` lists manifests that could not be read."""

    path: Path
    origin: str
    models: tuple[OllamaModel, ...]
    problems: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of the distinct blobs the models reference."""
        sizes: dict[BlobDigest, int] = {}
        for m in self.models:
            sizes[m.manifest.config.digest] = m.manifest.config.size
            for layer in m.manifest.layers:
                sizes[layer.digest] = layer.size
        return sum(sizes.values())

    def model(self, name: str) -> OllamaModel:
        """The model called ``name`` (Ollama's short forms accepted); raises :class:`NotFound`."""
        wanted = ModelName.parse(name)
        for m in self.models:
            if m.name.same_as(wanted):
                return m
        raise NotFound(f"model '{name}' not found in the Ollama store at {self.path}")


def scan_store(path: Path, origin: str = "source") -> OllamaStore:
    """Read every manifest of the store at ``path`` (read-only; blobs are only stat-ed)."""
    path = Path(path)
    models: list[OllamaModel] = []
    problems: list[str] = []
    root = path / "manifests"
    for host_dir in _entries(root, problems, dirs=True):
        for ns_dir in _entries(host_dir, problems, dirs=True):
            for model_dir in _entries(ns_dir, problems, dirs=True):
                for tag_file in _entries(model_dir, problems, dirs=False):
                    rel = tag_file.relative_to(root)
                    try:
                        models.append(_read_model(path, tag_file))
                    except (InvalidModelName, IntegrityError, OSError) as e:
                        problems.append(f"{rel}: {e}")
    models.sort(key=lambda m: m.name.key)
    return OllamaStore(path, origin, tuple(models), tuple(problems))


def _entries(folder: Path, problems: list[str], *, dirs: bool) -> list[Path]:
    """Sub-folders (or files) of ``folder``, hidden ones left out; an unreadable folder is a problem."""
    try:
        found = [p for p in folder.iterdir() if not p.name.startswith(".")]
        return sorted(p for p in found if (p.is_dir() if dirs else p.is_file()))
    except FileNotFoundError:
        return []
    except OSError as e:
        problems.append(f"{folder}: {e.strerror or e}")
        return []


def _read_model(store: Path, tag_file: Path) -> OllamaModel:
    host, namespace, model = tag_file.parts[-4:-1]
    name = ModelName.parse(f"{host}/{namespace}/{model}:{tag_file.name}")
    data = tag_file.read_bytes()
    manifest = Manifest.from_bytes(data)
    missing = []
    for layer in (manifest.config, *manifest.layers):
        try:
            ok = (store / "blobs" / blob_filename(layer.digest)).stat().st_size == layer.size
        except FileNotFoundError:
            ok = False
        if not ok and layer.digest not in missing:
            missing.append(layer.digest)
    return OllamaModel(name, tag_file, manifest, manifest_digest(data), tag_file.stat().st_mtime,
                       tuple(missing))
