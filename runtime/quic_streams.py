"""HTTP/3 request streams for omx's QUIC server (:mod:`omx.runtime.quic_server`): Hypercorn's on qh3.

:class:`H3Streams` is Hypercorn's ``H3Protocol`` speaking HTTP/3 with qh3's
``H3Connection``: it hands each request stream to the ASGI app as Hypercorn does
for HTTP/1.1 (``HTTPStream``). Two things differ:

* a large DATA frame's header and body go to the stream as two pieces
  (:class:`_H3Connection`), instead of being joined into one new ``bytes`` first;
* request streams offer the ASGI zero-copy send extension
  (``http.response.zerocopysend``, as the transfer listener does), so a
  :class:`~omx.functions.registry.FileRange` body (a peer chunk) is sent from the
  file itself (:class:`_FileStream`): its pages are mapped and qh3 copies them
  into its send queue, where Hypercorn's path read each 1 MiB piece with ``pread``
  in a worker thread into a fresh ``bytes`` first (``perf`` had that copy at a tenth
  of the serving node's CPU and the thread hand-off at another tenth). On 64 MiB chunks
  over loopback (interleaved A/Bs, 24 transfers each) reading into one reused buffer on
  the event loop instead took the serving node from 1.48 to 1.26 ms of CPU per MiB, and
  the mapped pages from 1.28 to 1.14; over bench/http3.py runs its median went from
  1.45 to 1.2 ms/MiB.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.config import Config
from hypercorn.protocol.events import Body, EndBody, Request, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h3 import H3Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.typing import AppWrapper, ConnectionState, WorkerContext
from hypercorn.utils import filter_pseudo_headers
from qh3._hazmat import encode_uint_var
from qh3.h3.connection import FrameType, FrameUnexpected, H3Connection, HeadersState
from qh3.h3.events import DataReceived, HeadersReceived, StopSending, StreamReset
from qh3.quic.connection import QuicConnection
from qh3.quic.events import QuicEvent

__all__ = ["FILE_PIECE", "ZEROCOPY", "H3Streams"]

_SPLIT_DATA = 64 << 10
"""Body pieces from this size on are not copied into their DATA frame (:class:`_H3Connection`)."""
ZEROCOPY = "http.response.zerocopysend"
FILE_PIECE = 1 << 20
"""Bytes of a file handed to qh3 at a time (the connection then waits for room, see ``SEND_BUFFER``)."""
_H3_INTERNAL_ERROR = 0x102
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux 5.14: map a range's pages now; an error where a read would raise ``SIGBUS`` (truncated, I/O error)."""


def _can_populate() -> bool:
    """Whether this kernel knows ``MADV_POPULATE_READ`` (without it a file is sent in ``pread`` pieces)."""
    try:
        with mmap.mmap(-1, mmap.PAGESIZE) as probe:
            probe.madvise(_MADV_POPULATE_READ, 0, mmap.PAGESIZE)
    except (OSError, ValueError, AttributeError):
        return False
    return True


_FILE_SEND = _can_populate()


class _H3Connection(H3Connection):
    """qh3's HTTP/3 connection, sending a large DATA frame's header and body as two pieces of the stream.

    qh3 joins them into one new ``bytes`` first (``encode_frame``): a copy of every 1 MiB body piece,
    a tenth of the serving loop's time on a chunk transfer (py-spy). The checks are qh3's own."""

    def send_data(self, stream_id: int, data: Any, end_stream: bool) -> None:
        if len(data) < _SPLIT_DATA:
            super().send_data(stream_id, data, end_stream)
            return
        stream = self._get_or_create_stream(stream_id)
        if stream.headers_send_state != HeadersState.AFTER_HEADERS:
            raise FrameUnexpected("DATA frame is not allowed in this state")
        if end_stream:
            stream.finish_sending()
        self._maybe_cleanup_stream(stream)
        self._quic.send_stream_data(stream_id, encode_uint_var(FrameType.DATA) + encode_uint_var(len(data)))
        self._quic.send_stream_data(stream_id, data, end_stream)


class H3Streams(H3Protocol):
    """Hypercorn's HTTP/3 protocol (request streams handed to the ASGI app) on qh3's ``H3Connection``."""

    def __init__(self, app: AppWrapper, config: Config, context: WorkerContext, task_group: Any,
                 state: ConnectionState, client: tuple[str, int] | None, server: tuple[str, int] | None,
                 quic: QuicConnection, send: Callable[[], Awaitable[None]],
                 idle: Callable[[], Awaitable[None]] | None = None) -> None:
        # Hypercorn's ``__init__`` would open aioquic's H3Connection on the qh3 connection.
        self.app, self.config, self.context, self.task_group, self.state = app, config, context, task_group, state
        self.client, self.server, self.send = client, server, send
        self.connection = _H3Connection(quic)  # type: ignore[assignment]
        self.streams = {}
        self.idle = idle
        """Awaited when the last request ends while the server is shutting down."""

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, StreamClosed) and event.stream_id not in self.streams:
            return  # the client reset the stream: what the app still writes goes nowhere
        if isinstance(event, StreamClosed):
            stream = self.streams.get(event.stream_id)
            if isinstance(stream, HTTPStream) and stream.state == ASGIHTTPState.RESPONSE:
                # The app ended (failed) half-way through its body: the client sees the stream reset
                # at once (as a cut connection over HTTP/1.1) instead of waiting for the rest.
                self.connection._quic.reset_stream(event.stream_id, _H3_INTERNAL_ERROR)
        await super().stream_send(event)
        if isinstance(event, StreamClosed):
            await self._maybe_idle()

    async def _maybe_idle(self) -> None:
        if not self.streams and self.idle is not None and self.context.terminated.is_set():
            await self.idle()

    async def handle(self, quic_event: QuicEvent) -> None:  # type: ignore[override]
        for event in self.connection.handle_event(quic_event):  # type: ignore[arg-type]
            if isinstance(event, HeadersReceived):
                if not self.context.terminated.is_set() and event.stream_id not in self.streams:
                    await self._create_stream(event)
                    if event.stream_ended:
                        await self.streams[event.stream_id].handle(EndBody(stream_id=event.stream_id))
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    continue
                if event.data:
                    await stream.handle(Body(stream_id=event.stream_id, data=event.data))
                if event.stream_ended:
                    await stream.handle(EndBody(stream_id=event.stream_id))
            elif isinstance(event, (StreamReset, StopSending)):
                # The client gave the request up (a peer cancelling a transfer): the app sees a disconnect
                # and its further writes are dropped (qh3 refuses DATA on the stream, an error per write).
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    await stream.handle(StreamClosed(stream_id=event.stream_id))
                    await self._maybe_idle()

    async def _create_stream(self, request: HeadersReceived) -> None:  # type: ignore[override]
        """Hypercorn's, with a request stream that can send a file (:class:`_FileStream`)."""
        fields = dict(request.headers)
        method, raw_path = fields.get(b":method", b"").decode("ascii").upper(), fields.get(b":path", b"")
        if method == "CONNECT" or not _FILE_SEND:
            await super()._create_stream(request)  # type: ignore[arg-type]
            return
        stream = self.streams[request.stream_id] = _FileStream(
            self.app, self.config, self.context, self.task_group, True, self.client, self.server,
            self.stream_send, request.stream_id)
        await stream.handle(Request(stream_id=request.stream_id, headers=filter_pseudo_headers(request.headers),
                                    http_version="3", method=method, raw_path=raw_path, state=self.state))
        await self.context.mark_request()

    async def _create_server_push(self, stream_id: int, path: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """omx pushes nothing (a push an app asks for is dropped, as for a client that refuses pushes)."""


class _FileStream(HTTPStream):
    """Hypercorn's HTTP stream that also takes ``http.response.zerocopysend``: a file range sent from its pages.

    The range is mapped read-only and sent :data:`FILE_PIECE` bytes at a time; each piece's pages are
    mapped in first (``MADV_POPULATE_READ``), so a file that became shorter or cannot be read fails the
    request with an ``OSError``, as a short ``pread`` does, instead of a ``SIGBUS`` in the copy. Like the
    transfer listener's ``sendfile``, a read from disk (a range not in the page cache) happens on the
    event loop; the kernel is asked to read the whole range ahead (``POSIX_FADV_WILLNEED``) at the start.
    A stream the client reset stops at the next piece."""

    async def handle(self, event: Any) -> None:
        await super().handle(event)
        if isinstance(event, Request) and self.scope is not None:  # the app's task has not run yet
            self.scope["extensions"][ZEROCOPY] = {}

    async def app_send(self, message: Any) -> None:
        if message is None or message["type"] != ZEROCOPY or self.state != ASGIHTTPState.RESPONSE:
            await super().app_send(message)
            return
        offset, count = int(message["offset"]), int(message["count"])
        if count > 0:
            await self._send_file(message["file"].fileno(), offset, count)
        if not message.get("more_body", False) and not self.closed:
            await self._send_closed()

    async def _send_file(self, fd: int, offset: int, count: int) -> None:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_WILLNEED)
        try:
            mapped = mmap.mmap(fd, offset + count - start, access=mmap.ACCESS_READ, offset=start)
        except ValueError as exc:  # the range reaches past the file's end
            raise OSError(f"cannot send {count} bytes at {offset}: {exc}") from exc
        with mapped, memoryview(mapped) as view:
            pos, end = offset - start, offset - start + count
            while pos < end and not self.closed:
                size = min(FILE_PIECE, end - pos)
                first = pos - pos % mmap.PAGESIZE
                mapped.madvise(_MADV_POPULATE_READ, first, pos + size - first)
                with view[pos:pos + size] as piece:
                    await self.send(Body(stream_id=self.stream_id, data=piece))  # type: ignore[arg-type]
                pos += size
