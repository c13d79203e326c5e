"""Small helpers over :class:`RegistryResponse`: bounded body reads and header lookup."""

from __future__ import annotations

import json
from typing import Any

from omx.errors import RegistryError
from omx.protocols import RegistryResponse

__all__ = ["discard", "error_detail", "header", "read_body"]


def header(response: RegistryResponse, name: str) -> str:
    """A response header by case-insensitive name, or ``""``."""
    lname = name.lower()
    for key, value in response.headers.items():
        if key.lower() == lname:
            return value
    return ""


async def read_body(response: RegistryResponse, *, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes (the stream is closed either way)."""
    out = bytearray()
    body = response.body
    try:
        async for piece in body:
            out += piece
            if len(out) > limit:
                raise RegistryError(f"answer from {response.url} is larger than {limit} bytes")
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
    return bytes(out)


async def discard(response: RegistryResponse) -> None:
    """Close a body without reading it."""
    aclose = getattr(response.body, "aclose", None)
    if aclose is not None:
        await aclose()


def error_detail(data: bytes) -> str:
    """The first message of a distribution-API error body (``{"errors": [{"message": …}]}``)."""
    try:
        doc: Any = json.loads(data)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if errors and isinstance(errors[0], dict):
            first = errors[0]
            return str(first.get("message") or first.get("code") or "")
        if isinstance(doc, dict) and doc.get("error"):
            return str(doc["error"])
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace").strip()
