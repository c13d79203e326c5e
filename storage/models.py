"""Value types the model store hands to its callers (frozen, JSON-ready via ``to_dict``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omx.timefmt import iso_time
from omx.types import BlobDigest

from .gguf_meta import GGUFInfo
from .manifests import Manifest, ModelConfig
from .names import ModelName

__all__ = ["ModelDetails", "ModelEntry", "ResolvedModel", "model_row"]


@dataclass(frozen=True)
class ModelDetails:
    """Ollama's ``details`` object of ``/api/tags`` and ``/api/show``."""

    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: tuple[str, ...] = ()
    parameter_size: str = ""
    quantization_level: str = ""

    @classmethod
    def from_config(cls, config: ModelConfig, parent_model: str = "") -> ModelDetails:
        return cls(parent_model, config.model_format, config.model_family, config.model_families,
                   config.model_type, config.file_type)

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent_model": self.parent_model,
            "format": self.format,
            "family": self.family,
            "families": list(self.families) or None,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``/api/tags``. ``name`` is the short display name, ``model`` the full reference."""

    name: str
    model: str
    digest: BlobDigest
    size: int
    modified_at: datetime
    details: ModelDetails
    read_only: bool = False
    """True when the model lives in an extra (read-only) root."""

    def to_dict(self) -> dict[str, Any]:
        """This model's row of ``/api/tags`` (see :func:`model_row`)."""
        return model_row(self.name, size=self.size, digest=self.digest, details=self.details,
                         modified_at=self.modified_at)


def model_row(name: str, *, size: int, digest: str, details: ModelDetails | None,
              modified_at: datetime | None = None) -> dict[str, Any]:
    """A model in Ollama's list shape, shared by ``/api/tags`` and ``/api/ps`` rows.

    ``model`` repeats the display name and ``digest`` is bare hex, as Ollama's; endpoints add
    their own fields after these (``expires_at``, ``size_vram``…).
    """
    row: dict[str, Any] = {"name": name, "model": name}
    if modified_at is not None:
        row["modified_at"] = iso_time(modified_at)
    row.update(size=size, digest=digest.removeprefix("sha256:"), details=details.to_dict() if details else {})
    return row


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to load and describe a model, read from its manifest and blobs."""

    name: ModelName
    manifest: Manifest
    manifest_digest: BlobDigest
    config: ModelConfig
    model_digest: BlobDigest
    model_path: Path
    model_size: int
    adapter_paths: tuple[Path, ...]
    projector_paths: tuple[Path, ...]
    template: str | None
    system: str | None
    license: tuple[str, ...]
    messages: tuple[Mapping[str, Any], ...]
    params: Mapping[str, Any]
    details: ModelDetails
    modified_at: datetime
    gguf: GGUFInfo | None = None
    size: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> list[str]:
        """Ollama's capability list: completion|embedding, tools, insert, vision."""
        caps = ["embedding"] if self.gguf is not None and self.gguf.is_embedding else ["completion"]
        template = self.template if self.template is not None else (
            self.gguf.chat_template if self.gguf is not None else None) or ""
        if ".Tools" in template or ("tools" in template and "{%" in template):
            caps.append("tools")
        if ".Suffix" in template:
            caps.append("insert")
        has_vision_tower = self.gguf is not None and any(
            k.endswith(".vision.block_count") for k in self.gguf.model_info)
        if self.projector_paths or has_vision_tower:
            caps.append("vision")
        return caps
