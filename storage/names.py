"""Model names and blob digests, parsed and validated the way Ollama does.

A name is ``[host/][namespace/]model[:tag]``; missing parts take the defaults
``registry.ollama.ai``, ``library`` and ``latest``. Each part follows Ollama's
rules (``types/model/name.go``): the first character is a letter, digit or
``_``; the rest may add ``-`` and ``.`` (not ``.`` in a namespace) and, in a
host only, ``:`` for a port. Host parts are 1-350 bytes, the others 1-80.
Those rules already keep a name from escaping the store (no ``/``, ``\\``,
NUL, ``..`` or absolute paths can survive them); the checks here reject such
input with a message that says what was wrong.

Names keep the case they were written in; lookups compare them
case-insensitively (:attr:`ModelName.key`), as Ollama does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omx.errors import InvalidDigest, InvalidModelName
from omx.types import BlobDigest, ModelRef

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "ModelName",
    "blob_filename",
    "parse_digest",
]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_MAX_LEN = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
_PART_RE = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*\Z"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\Z"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z"),
}
_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-f]{64})\Z")


def _check_part(kind: str, value: str, text: str) -> None:
    if value == "":
        raise InvalidModelName(f"invalid model name {text!r}: the {kind} part is empty")
    if len(value) > _MAX_LEN[kind]:
        raise InvalidModelName(
            f"invalid model name {text!r}: the {kind} part is longer than {_MAX_LEN[kind]} characters"
        )
    if value in (".", "..") or ".." in value:
        # Both a traversal attempt and something Ollama's parser refuses.
        raise InvalidModelName(f"invalid model name {text!r}: the {kind} part may not contain '..'")
    if not _PART_RE[kind].match(value):
        allowed = {
            "host": "letters, digits, '_', '-', '.' and ':'",
            "namespace": "letters, digits, '_' and '-'",
            "model": "letters, digits, '_', '-' and '.'",
            "tag": "letters, digits, '_', '-' and '.'",
        }[kind]
        raise InvalidModelName(
            f"invalid model name {text!r}: the {kind} part {value!r} may only contain {allowed}, "
            "and must start with a letter, digit or '_'"
        )


@dataclass(frozen=True)
class ModelName:
    """A fully qualified model name; build it with :meth:`parse`."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        default_host: str = DEFAULT_HOST,
        default_namespace: str = DEFAULT_NAMESPACE,
    ) -> ModelName:
        """Parse ``[host/][namespace/]model[:tag]``; raises :class:`InvalidModelName`."""
        if not isinstance(text, str) or text.strip() == "":
            raise InvalidModelName("invalid model name: the name is empty")
        raw = text
        if "\x00" in raw or "\\" in raw:
            raise InvalidModelName(f"invalid model name {text!r}: it contains a NUL or backslash")
        for scheme in ("https://", "http://"):
            if raw.startswith(scheme):
                raw = raw[len(scheme):]
                break
        if raw.startswith("/"):
            raise InvalidModelName(f"invalid model name {text!r}: it may not start with '/'")
        if "@" in raw:
            raise InvalidModelName(f"invalid model name {text!r}: digest references are not model names")
        tag = DEFAULT_TAG
        # A ':' after the last '/' starts the tag; one before it is a host's port.
        if raw.rfind(":") > raw.rfind("/"):
            raw, tag = raw.rsplit(":", 1)
            _check_part("tag", tag, text)
        pieces = raw.split("/")
        if len(pieces) > 3:
            raise InvalidModelName(
                f"invalid model name {text!r}: expected [host/][namespace/]model[:tag]"
            )
        host, namespace = default_host, default_namespace
        if len(pieces) == 3:
            host, namespace, model = pieces
        elif len(pieces) == 2:
            namespace, model = pieces
        else:
            (model,) = pieces
        _check_part("host", host, text)
        _check_part("namespace", namespace, text)
        _check_part("model", model, text)
        return cls(host=host, namespace=namespace, model=model, tag=tag)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Case-folded parts: two names are the same model when their keys are equal."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def same_as(self, other: ModelName) -> bool:
        """Case-insensitive equality, as Ollama's ``EqualFold``."""
        return self.key == other.key

    @property
    def full(self) -> ModelRef:
        """``host/namespace/model:tag``."""
        return ModelRef(f"{self.host}/{self.namespace}/{self.model}:{self.tag}")

    @property
    def display(self) -> str:
        """The short form Ollama shows (``model:tag`` for the default host and namespace)."""
        if self.host.lower() != DEFAULT_HOST:
            return self.full
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def manifest_path(self, root: Path) -> Path:
        """``<root>/manifests/<host>/<namespace>/<model>/<tag>``."""
        return Path(root, "manifests", *self.parts)

    def __str__(self) -> str:
        return self.display


def parse_digest(text: str) -> BlobDigest:
    """Parse ``sha256:<64 hex>`` or ``sha256-<64 hex>`` into the ``sha256:`` form."""
    if not isinstance(text, str):
        raise InvalidDigest("invalid digest: expected a string")
    m = _DIGEST_RE.match(text)
    if m is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidDigest(f"invalid digest format {shown!r}: expected sha256:<64 lowercase hex digits>")
    return BlobDigest("sha256:" + m.group(1))


def blob_filename(digest: BlobDigest) -> str:
    """The file name of a blob in ``blobs/``: ``sha256-<hex>``."""
    return parse_digest(digest).replace(":", "-", 1)
