"""The response of a :class:`~omx.functions.registry.FileRange` handler result.

Where the server offers the ASGI zero-copy send extension
(``http.response.zerocopysend``) the server sends the range from the file
itself: the transfer listener in :mod:`omx.runtime.peer.server` with
``sendfile``, omx's HTTP/3 streams (:mod:`omx.runtime.quic_streams`) from the
file's mapped pages. Elsewhere (Hypercorn's HTTP/1.1) the range goes out in
large pieces read with ``pread`` in a worker thread: one read per piece, no
intermediate buffer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from omx.functions.registry import FileRange

__all__ = ["FileRangeResponse"]

_ZEROCOPY = "http.response.zerocopysend"
PIECE = 1 << 20
"""Bytes per body message on servers without zero-copy send (measured: larger gains nothing)."""


class FileRangeResponse(Response):
    """Sends ``rng`` and then closes its file, whatever happens."""

    def __init__(self, rng: FileRange, headers: Mapping[str, str]) -> None:
        self.range = rng
        super().__init__(None, status_code=rng.status, media_type=rng.media_type,
                         headers={**headers, **rng.headers, "content-length": str(rng.length)})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        rng = self.range
        sent = 0
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope.get("method") == "HEAD" or rng.length == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif _ZEROCOPY in scope.get("extensions", {}):
                with os.fdopen(rng.fd, "rb", buffering=0, closefd=False) as file:
                    await send({"type": _ZEROCOPY, "file": file, "offset": rng.offset, "count": rng.length,
                                "more_body": False})
                sent = rng.length
            else:
                sent = await self._pieces(send)
        finally:
            rng.close()
            if rng.on_sent is not None:
                rng.on_sent(sent)

    async def _pieces(self, send: Any) -> int:
        rng = self.range
        pos, end = rng.offset, rng.offset + rng.length
        while pos < end:
            data = await asyncio.to_thread(os.pread, rng.fd, min(PIECE, end - pos), pos)
            if not data:
                raise OSError(f"file ended {end - pos} bytes before the announced range")
            pos += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": pos < end})
        return rng.length
