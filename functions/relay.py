"""What the router needs to relay a peer's answer: its reply shape, whole reads, failure wording (pure helpers)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from omx.errors import PeerError

__all__ = ["MAX_JSON_REPLY", "RETRYABLE", "STREAM_ERRORS", "PeerReply", "cut_error", "error_text", "read_all",
           "retryable", "streamed"]

MAX_JSON_REPLY = 256 << 20
RETRYABLE = frozenset({401, 403, 404, 408, 429})
"""Statuses (besides 5xx) after which a call is tried on the next holder."""
STREAM_ERRORS = (b'{"error"', b'data: {"error"')
"""How a stream that failed before its first token starts (NDJSON, SSE), as the adapter writes it."""


class PeerReply(Protocol):
    """A peer's answer whose body is still arriving."""

    @property
    def status(self) -> int:
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-cased names."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises :class:`~omx.errors.PeerError` when the transfer breaks."""
        ...

    async def aclose(self) -> None:
        """Drop the connection if the body was not read to its end."""
        ...


def retryable(status: int) -> bool:
    return status >= 500 or status in RETRYABLE


def streamed(media: str) -> bool:
    return media.startswith(("application/x-ndjson", "text/event-stream"))


def cut_error(node: str, reason: str, *, sse: bool) -> bytes:
    message = f"node {node} stopped answering mid-stream: {reason}"
    if sse:
        return b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


async def read_all(reply: PeerReply, limit: int = MAX_JSON_REPLY) -> bytes:
    """A peer reply's whole body (at most ``limit`` bytes); raises PeerError."""
    body = bytearray()
    async for piece in reply.chunks():
        body += piece
        if len(body) > limit:
            raise PeerError(f"peer reply is larger than {limit} bytes")
    return bytes(body)


def error_text(body: bytes, status: int) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return f"status {status}"
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else f"status {status}"
