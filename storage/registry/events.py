"""Progress events of a pull or push, in the shape Ollama streams them.

Ollama's ``api.ProgressResponse`` marks ``digest``, ``total`` and ``completed``
``omitempty``, so zero values are left out of the wire form exactly as Go's
encoder leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omx.types import BlobDigest

__all__ = ["LayerProgress", "ProgressEvent", "Status", "layer_label"]


def layer_label(verb: str, digest: BlobDigest) -> str:
    """``pulling 1a2b3c4d5e6f``: Ollama shows ``digest[7:19]`` (12 hex digits after ``sha256:``)."""
    return f"{verb} {digest[7:19]}"


@dataclass(frozen=True)
class Status:
    """A step without byte counts: ``pulling manifest``, ``success``…"""

    status: str

    def to_ollama(self) -> dict[str, Any]:
        return {"status": self.status}


@dataclass(frozen=True)
class LayerProgress:
    """Bytes done for one layer; ``verb`` is ``pulling`` or ``pushing``."""

    verb: str
    digest: BlobDigest
    total: int
    completed: int

    @property
    def status(self) -> str:
        return layer_label(self.verb, self.digest)

    def to_ollama(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "digest": self.digest}
        if self.total:
            out["total"] = self.total
        if self.completed:
            out["completed"] = self.completed
        return out


ProgressEvent = Status | LayerProgress
