"""Typed identifiers shared across layers.

They are ``NewType`` aliases of ``str``: free at run time, distinct to the type
checker, so a chunk digest is never passed where a node id is expected.
"""

from __future__ import annotations

from typing import NewType

__all__ = ["BlobDigest", "ChunkDigest", "ModelRef", "NodeId"]

NodeId = NewType("NodeId", str)
"""A node's stable identity, e.g. ``omx-1a2b3c4d``; also its Serf node name."""

BlobDigest = NewType("BlobDigest", str)
"""A blob's content address in Ollama's form: ``sha256:<64 hex>``."""

ChunkDigest = NewType("ChunkDigest", str)
"""A chunk's BLAKE3 hash, 64 lowercase hex characters."""

ModelRef = NewType("ModelRef", str)
"""A fully qualified model name: ``registry/namespace/model:tag``."""
