"""What the router needs to relay a peer's answer: its reply shape, whole reads, JSON answers, failure wording."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from omx.errors import PeerError

log = logging.getLogger("omx.routing")

__all__ = ["MAX_JSON_REPLY", "RETRYABLE", "STREAM_ERRORS", "PeerReply", "cut_error", "error_text", "json_answer",
           "read_all", "relay_lines", "retryable", "streamed"]

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


async def json_answer(request: Callable[[], Awaitable[PeerReply]], node: str, path: str,
                      within_s: float) -> tuple[int, Any]:
    """The status and JSON body of the reply ``request`` gets from ``node`` for ``path``, all within
    ``within_s``; raises :class:`~omx.errors.PeerError` on a timeout or a body that is not JSON."""
    try:
        async with asyncio.timeout(within_s):
            reply = await request()
            try:
                raw = await read_all(reply)
            finally:
                await reply.aclose()
    except TimeoutError as exc:
        raise PeerError(f"{node} did not answer {path} within {within_s:g} s") from exc
    try:
        return reply.status, json.loads(raw) if raw else None
    except ValueError as exc:
        raise PeerError(f"{node} answered {path} with invalid JSON") from exc


async def relay_lines(node: str, first: bytes, chunks: AsyncIterator[bytes], reply: PeerReply,
                      end: Callable[[], None], *, sse: bool) -> AsyncIterator[bytes]:
    """``node``'s stream byte for byte, in whole lines (events); a break ends it with an error object.

    ``end`` is called and ``reply`` closed when it ends, however it ends.
    """
    sep = b"\n\n" if sse else b"\n"
    pending = bytearray()
    try:
        piece: bytes | None = first
        while piece is not None:
            if not pending and piece.endswith(sep):
                yield piece  # the usual case: one whole line per piece
            elif piece:
                pending += piece
                cut = pending.rfind(sep)
                if cut >= 0:
                    cut += len(sep)
                    out = bytes(pending[:cut])
                    del pending[:cut]
                    yield out
            piece = await anext(chunks, None)
        if pending:
            yield bytes(pending)
    except PeerError as exc:
        log.warning("stream from %s broke off: %s", node, exc)
        yield cut_error(node, str(exc), sse=sse)
    finally:
        end()
        await reply.aclose()
