"""Ollama manifests and config blobs.

A manifest is the Docker v2 manifest Ollama writes: a config blob (JSON
describing the model) and an ordered list of layers, each a blob with a media
type. Untrusted bytes are validated with pydantic; inside, a manifest is the
frozen :class:`Manifest`. Its digest is the sha256 of its exact bytes, which is
what ``/api/tags`` reports, so :meth:`Manifest.to_bytes` is deterministic and
compact, like Go's ``json.Marshal``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omx.errors import IntegrityError
from omx.types import BlobDigest

from .names import parse_digest

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "LAYER_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPE",
    "MEDIA_ADAPTER",
    "MEDIA_LICENSE",
    "MEDIA_MESSAGES",
    "MEDIA_MODEL",
    "MEDIA_PARAMS",
    "MEDIA_PROJECTOR",
    "MEDIA_SYSTEM",
    "MEDIA_TEMPLATE",
    "Layer",
    "Manifest",
    "ModelConfig",
    "manifest_digest",
]

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
LAYER_MEDIA_TYPES = frozenset({
    MEDIA_MODEL, MEDIA_ADAPTER, MEDIA_PROJECTOR, MEDIA_TEMPLATE, MEDIA_SYSTEM,
    MEDIA_PARAMS, MEDIA_MESSAGES, MEDIA_LICENSE,
})

_MAX_MANIFEST_BYTES = 4 << 20


class _DescriptorIn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    from_: str | None = Field(default=None, alias="from")


class _ManifestIn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    schema_version: int = Field(alias="schemaVersion")
    media_type: str = Field(default=MANIFEST_MEDIA_TYPE, alias="mediaType")
    config: _DescriptorIn
    layers: list[_DescriptorIn]


@dataclass(frozen=True)
class Layer:
    """One blob of a manifest. ``from_`` is Ollama's optional ``from`` field, kept as read."""

    media_type: str
    digest: BlobDigest
    size: int
    from_: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_:
            d["from"] = self.from_
        return d


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its config descriptor and its layers, in order."""

    config: Layer
    layers: tuple[Layer, ...]
    schema_version: int = 2
    media_type: str = MANIFEST_MEDIA_TYPE

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes; raises :class:`IntegrityError` when they are not a valid manifest."""
        if len(data) > _MAX_MANIFEST_BYTES:
            raise IntegrityError("manifest is too large")
        try:
            m = _ManifestIn.model_validate_json(data)
            if m.schema_version != 2:
                raise ValueError(f"unsupported schemaVersion {m.schema_version}")

            def conv(d: _DescriptorIn) -> Layer:
                return Layer(d.media_type, parse_digest(d.digest), d.size, d.from_)

            return cls(conv(m.config), tuple(conv(d) for d in m.layers), m.schema_version, m.media_type)
        except (ValidationError, ValueError) as e:
            raise IntegrityError(f"invalid manifest: {e}") from e

    def to_bytes(self) -> bytes:
        doc = {
            "schemaVersion": self.schema_version,
            "mediaType": self.media_type,
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @property
    def blobs(self) -> tuple[BlobDigest, ...]:
        """Every blob the manifest references (config first), without duplicates."""
        seen: dict[BlobDigest, None] = {self.config.digest: None}
        for layer in self.layers:
            seen.setdefault(layer.digest, None)
        return tuple(seen)

    @property
    def total_size(self) -> int:
        """Config + layers, as Ollama's ``/api/tags`` ``size``."""
        return self.config.size + sum(layer.size for layer in self.layers)

    def layers_of(self, media_type: str) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.media_type == media_type)

    def first(self, media_type: str) -> Layer | None:
        found = self.layers_of(media_type)
        return found[0] if found else None


def manifest_digest(data: bytes) -> BlobDigest:
    """The digest Ollama shows for a manifest: sha256 of its exact bytes."""
    return BlobDigest("sha256:" + hashlib.sha256(data).hexdigest())


class _ConfigIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    model_format: str = ""
    model_family: str = ""
    model_families: list[str] | None = None
    model_type: str = ""
    file_type: str = ""
    architecture: str = ""
    os: str = ""
    rootfs: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    """The config blob Ollama writes (``model.ConfigV2``).

    ``model_type`` is the parameter size (``"268.10M"``), ``file_type`` the
    quantization level (``"Q4_K_M"``). ``extra`` keeps fields newer Ollama
    versions add (``renderer``, ``capabilities``…) so a rewrite keeps them.
    """

    model_format: str = ""
    model_family: str = ""
    model_families: tuple[str, ...] = ()
    model_type: str = ""
    file_type: str = ""
    architecture: str = "amd64"
    os: str = "linux"
    diff_ids: tuple[BlobDigest, ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelConfig:
        try:
            c = _ConfigIn.model_validate_json(data)
        except ValidationError as e:
            raise IntegrityError(f"invalid model config blob: {e}") from e
        diff_ids = tuple(BlobDigest(str(d)) for d in (c.rootfs.get("diff_ids") or ()))
        extra = tuple(sorted((c.model_extra or {}).items()))
        return cls(c.model_format, c.model_family, tuple(c.model_families or ()), c.model_type,
                   c.file_type, c.architecture, c.os, diff_ids, extra)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "model_format": self.model_format,
            "model_family": self.model_family,
            "model_families": list(self.model_families) or None,
            "model_type": self.model_type,
            "file_type": self.file_type,
            "architecture": self.architecture,
            "os": self.os,
            "rootfs": {"type": "layers", "diff_ids": list(self.diff_ids)},
        }
        for k, v in self.extra:
            doc.setdefault(k, v)
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
