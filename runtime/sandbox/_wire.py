"""The pipe protocol between the node and a sandboxed worker.

A frame is a 4-byte big-endian length and an orjson-encoded array; the worker
reads its stdin and writes its stdout (it keeps copies of both descriptors and
points user code's fd 1 at stderr). ``seq`` numbers the calls of one worker;
a frame carrying an older ``seq`` is stale and dropped.

Node -> worker::

    ["load", {"filename", "source", "qualname" | null, "node"}]   first frame; null qualname: list the functions
    ["call", seq, body, headers]                                   one call at a time
    ["reply", rid, true, body] | ["reply", rid, false, [status, message]]   answer to a "model" frame

Worker -> node::

    ["ready", 0, [spec, ...]]             loaded (the specs it found, or the one it serves)
    ["fatal", 0, message, line | null]    the file does not load; the worker exits
    ["result", seq, value, cpu_s]         a plain result
    ["stream", seq], ["item", seq, value]..., ["end", seq, cpu_s]   a generator's items
    ["error", seq, status, message, retire]   the call failed (retire: the worker exits after it)
    ["model", seq, rid, kind, body]       ctx.generate / chat / embed: the node answers with "reply"
    ["log", seq, line]                    ctx.log
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

__all__ = ["MAX_FRAME", "ProtocolError", "encode", "read_frame"]

MAX_FRAME = 64 * 2**20
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The worker wrote something that is not a frame."""


def encode(frame: list[Any]) -> bytes:
    data = orjson.dumps(frame)
    return _HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> list[Any] | None:
    """The next frame, or None at the end of the stream."""
    try:
        head = await reader.readexactly(4)
        size = _HEADER.unpack(head)[0]
        if size > MAX_FRAME:
            raise ProtocolError(f"a frame of {size} bytes is over the limit")
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    try:
        frame = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"a frame is not JSON: {exc}") from None
    if not isinstance(frame, list) or len(frame) < 2 or not isinstance(frame[0], str):
        raise ProtocolError("a frame is not an array [op, seq, ...]")
    return frame
