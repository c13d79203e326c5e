"""HTTP/3 client transports for httpx, over qh3, verified against the cluster CA.

:class:`AsyncHttp3Transport` is an ``httpx.AsyncBaseTransport``: one QUIC
connection per ``host:port`` (opened on first use, reopened when it closes),
requests as HTTP/3 streams, response bodies streamed as their DATA frames
arrive. :class:`Http3Transport` is the synchronous ``httpx.BaseTransport``
the CLI uses: it runs the async transport on an event loop in a helper thread.
The QUIC stack is qh3, aioquic's fork with the connection, packet protection and
HTTP/3 framing in Rust, as for the peer client (:mod:`omx.runtime.peer.h3`); aioquic's
Python connection bounded a 64 MiB upload to about 67 MB/s (bench/http3.py) and cannot
send datagrams past 16 KiB.
Either plugs into an ``httpx`` client (``transport=``), so callers keep
httpx's API and its exception types: a refused handshake or an untrusted
certificate is ``httpx.ConnectError``, a connection lost mid-body
``httpx.ReadError``, and the client's timeouts apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
from qh3._hazmat import Buffer
from qh3.asyncio._transport import OptimizedDatagramTransport
from qh3.asyncio.client import connect
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.h3.connection import H3_ALPN, H3Connection
from qh3.h3.events import DataReceived, H3Event, HeadersReceived
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.events import ConnectionTerminated, QuicEvent
from qh3.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters
from qh3.tls import ExtensionType

__all__ = ["LARGE_LOOPBACK_DATAGRAM", "SEND_BUFFER", "SOCKET_BUFFER", "AsyncHttp3Transport", "Http3Transport",
           "advertise_datagram_size", "close_quietly", "datagram_size", "enlarge_buffers", "receive_plainly"]

_END = object()

LARGE_LOOPBACK_DATAGRAM = 65000
"""Datagram size omx's HTTP/3 server and clients use towards loopback (under the 65,507 (IPv4) and
65,487 (IPv6) bytes of UDP payload loopback's 64 KiB MTU carries): the per-packet work bounds throughput,
so bigger packets carry more for the same work (an upload over aioquic ran 1.7 MB/s at 1200 bytes, 18 MB/s
at 16 KiB)."""
SEND_BUFFER = 4 << 20
"""Bytes of a request body the connection holds not yet sent before the next piece waits."""
_PIECE = 1 << 20
SAFE_DATAGRAM = 1200
"""Elsewhere QUIC's minimum, which every path carries (omx's server does no path-MTU discovery)."""


SOCKET_BUFFER = 4 << 20
"""Receive and send buffer asked for each QUIC socket (the kernel caps it at ``net.core.rmem_max``). A burst
of large datagrams overflows the default (about 208 KiB) while Python is busy, and every datagram lost
halves the sender's congestion window."""


def _not_a_peer_close(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Native peer close")


# qh3 logs every connection the other side closes, the normal end of one, as a warning (logger "quic").
logging.getLogger("quic").addFilter(_not_a_peer_close)


def enlarge_buffers(sock: Any) -> None:
    """Ask for :data:`SOCKET_BUFFER` bytes of receive and send buffer on a UDP socket (best effort)."""
    import socket

    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


class _PlainReceiving(OptimizedDatagramTransport):
    """qh3's datagram transport receiving each datagram with one ``recvfrom`` straight into its ``bytes``.

    qh3's own path (quinn-udp) takes a batch with ``recvmmsg`` into one buffer and copies every
    datagram out of it into a new ``bytes``: on a 64 MiB chunk over loopback (65,000-byte datagrams)
    that copy was a sixth of the receiving loop's time (py-spy). The datagrams read at once still go
    to the connection together (``datagrams_received``), as qh3's do."""

    __slots__ = ()

    def _recv_plain(self) -> None:
        protocol = self._protocol
        recvfrom = self._sock.recvfrom
        batch: list[bytes] = []
        source: Any = None
        for _ in range(_RECEIVE_BATCH):
            try:
                data, address = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._report_error(exc)
                break
            if batch and address != source:
                protocol.datagrams_received(batch, source)  # type: ignore[attr-defined]
                batch = []
            batch.append(data)
            source = address
        if batch and not self._closing:
            protocol.datagrams_received(batch, source)  # type: ignore[attr-defined]


_RECEIVE_BATCH = 64


def receive_plainly(transport: Any, host: str) -> bool:
    """Make a qh3 client transport talking to ``host`` receive with :class:`_PlainReceiving` (it sends as
    before) where ``host`` is on loopback: its datagrams are large (:func:`datagram_size`), so a system call
    each costs little beside the copy it saves. Elsewhere datagrams are 1200 bytes and qh3's batched
    ``recvmmsg`` (with GRO) stays. False where left as it was, also for a transport that is not the kind
    this knows (another qh3 release)."""
    if datagram_size(host) <= SAFE_DATAGRAM:
        return False
    if type(transport) is not OptimizedDatagramTransport or not hasattr(transport._protocol, "datagrams_received"):
        return False
    transport._udp_state = None  # qh3 reads through quinn-udp while it has one
    transport._gro_enabled = False  # and through recvmsg with GRO while this is set
    transport.__class__ = _PlainReceiving
    return True


def datagram_size(host: str) -> int:
    """The largest QUIC datagram to send to and take from ``host``."""
    if host == "localhost":
        return LARGE_LOOPBACK_DATAGRAM
    try:
        return LARGE_LOOPBACK_DATAGRAM if ipaddress.ip_address(host).is_loopback else SAFE_DATAGRAM
    except ValueError:
        return SAFE_DATAGRAM


def advertise_datagram_size(quic: Any) -> None:
    """Make ``quic`` (a qh3 client connection) advertise its ``max_datagram_size`` as the largest UDP
    payload it takes (the ``max_udp_payload_size`` transport parameter), where qh3 always says 1472.

    qh3 receives datagrams of any size; a server that honours the parameter (omx's, see
    :mod:`omx.runtime.quic_server`) then sends datagrams up to its own limit towards a loopback client
    instead of 1472 bytes."""
    size = quic._configuration.max_datagram_size
    create_tls = quic._create_tls

    def advertising(remote_source_cid: bytes | None) -> Any:
        bridge = create_tls(remote_source_cid)
        serialize = bridge.serialize_transport_parameters

        def serialize_transport_parameters() -> bytes:
            params = pull_quic_transport_parameters(Buffer(data=serialize()))
            params.max_udp_payload_size = max(params.max_udp_payload_size or 0, size)
            buf = Buffer(capacity=4096)
            push_quic_transport_parameters(buf, params)
            return bytes(buf.data)

        bridge.serialize_transport_parameters = serialize_transport_parameters
        bridge.tls.handshake_extensions = [(ExtensionType.QUIC_TRANSPORT_PARAMETERS, serialize_transport_parameters())]
        return bridge

    quic._create_tls = advertising


class _Stream:
    def __init__(self) -> None:
        self.headers: asyncio.Future[list[tuple[bytes, bytes]]] = asyncio.get_running_loop().create_future()
        self.chunks: asyncio.Queue[Any] = asyncio.Queue()


class _H3Client(QuicConnectionProtocol):
    """One QUIC connection speaking HTTP/3; events are routed to the stream they belong to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        advertise_datagram_size(self._quic)
        self.h3 = H3Connection(self._quic)
        self.streams: dict[int, _Stream] = {}
        self.closed: str | None = None
        self._room: asyncio.Future[None] | None = None

    def _held(self) -> int:
        """Bytes of the streams not sent yet (qh3's send queues)."""
        held: int = self._quic.get_send_buffer_size()
        return held

    def transmit(self) -> None:
        super().transmit()  # after every datagram received and timer
        if self._room is not None and (self.closed is not None or self._held() <= SEND_BUFFER):
            if not self._room.done():
                self._room.set_result(None)
            self._room = None

    async def _wait_for_room(self) -> None:
        """Wait while more than :data:`SEND_BUFFER` bytes are not sent yet, so a large upload is not
        queued whole (its memory stays bounded, and the caller's body is read as it is sent)."""
        while self.closed is None and self._held() > SEND_BUFFER:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.closed = event.reason_phrase or f"error {event.error_code}"
            if self._room is not None and not self._room.done():
                self._room.set_result(None)
            for stream in self.streams.values():
                if not stream.headers.done():
                    stream.headers.set_exception(httpx.ReadError(f"HTTP/3 connection closed: {self.closed}"))
                stream.chunks.put_nowait(httpx.ReadError(f"HTTP/3 connection closed: {self.closed}"))
            self.streams.clear()
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        stream_id: int = getattr(event, "stream_id", -1)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if isinstance(event, HeadersReceived):
            if not stream.headers.done():
                stream.headers.set_result(list(event.headers))
        elif isinstance(event, DataReceived) and event.data:
            stream.chunks.put_nowait(event.data)
        if getattr(event, "stream_ended", False):
            if not stream.headers.done():
                stream.headers.set_exception(httpx.RemoteProtocolError("HTTP/3 stream ended without headers"))
            stream.chunks.put_nowait(_END)
            self.streams.pop(stream_id, None)

    async def send_request(self, request: httpx.Request) -> tuple[int, _Stream]:
        stream_id = self._quic.get_next_available_stream_id()
        stream = self.streams[stream_id] = _Stream()
        url = request.url
        headers = [(b":method", request.method.encode()), (b":scheme", b"https"),
                   (b":authority", url.netloc), (b":path", url.raw_path)]
        headers += [(k.lower(), v) for k, v in request.headers.raw
                    if k.lower() not in (b"host", b"connection", b"transfer-encoding", b"keep-alive")]
        body = request.stream
        if isinstance(body, httpx.ByteStream):
            data = memoryview(b"".join(body))
            self.h3.send_headers(stream_id, headers, end_stream=not data)
            self.transmit()
            for start in range(0, len(data), _PIECE):
                await self._send_piece(stream_id, data[start:start + _PIECE], start + _PIECE >= len(data))
            return stream_id, stream
        self.h3.send_headers(stream_id, headers)
        self.transmit()
        async for chunk in _chunks(body):
            await self._send_piece(stream_id, chunk, False)
        self.h3.send_data(stream_id, b"", end_stream=True)
        self.transmit()
        return stream_id, stream

    async def _send_piece(self, stream_id: int, data: bytes | memoryview, end: bool) -> None:
        if self.closed is not None:
            raise httpx.WriteError(f"HTTP/3 connection closed: {self.closed}")
        self.h3.send_data(stream_id, bytes(data), end_stream=end)
        self.transmit()
        await self._wait_for_room()


async def _chunks(body: Any) -> AsyncIterator[bytes]:
    if isinstance(body, httpx.AsyncByteStream):
        async for chunk in body:
            yield chunk
    else:
        for chunk in body:
            yield chunk


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: _Stream, read_timeout: float | None) -> None:
        self.stream = stream
        self.read_timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                item = await asyncio.wait_for(self.stream.chunks.get(), self.read_timeout)
            except TimeoutError as exc:
                raise httpx.ReadTimeout("HTTP/3 read timed out") from exc
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class AsyncHttp3Transport(httpx.AsyncBaseTransport):
    """HTTP/3 for ``https://`` URLs, trusting only ``cafile`` (the cluster CA)."""

    def __init__(self, cafile: Path | str) -> None:
        self.cafile = str(cafile)
        self._connections: dict[tuple[str, int], tuple[contextlib.AsyncExitStack, _H3Client]] = {}
        self._lock = asyncio.Lock()

    async def _connection(self, host: str, port: int, connect_s: float | None) -> _H3Client:
        async with self._lock:
            known = self._connections.get((host, port))
            if known is not None and known[1].closed is None:
                return known[1]
            if known is not None:
                self._connections.pop((host, port))
                with contextlib.suppress(Exception):
                    await known[0].aclose()
            config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host,
                                       max_datagram_size=datagram_size(host))
            config.load_verify_locations(cafile=self.cafile)
            stack = contextlib.AsyncExitStack()
            try:
                client = await asyncio.wait_for(
                    stack.enter_async_context(connect(host, port, configuration=config,
                                                      create_protocol=_H3Client, wait_connected=True)),
                    connect_s)
            except TimeoutError as exc:
                await close_quietly(stack)
                raise httpx.ConnectTimeout(f"no HTTP/3 answer from {host}:{port}") from exc
            except (ConnectionError, OSError, ValueError) as exc:
                await close_quietly(stack)
                raise httpx.ConnectError(f"HTTP/3 connection to {host}:{port} failed: {exc}") from exc
            assert isinstance(client, _H3Client)
            self._connections[(host, port)] = (stack, client)
            return client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise httpx.UnsupportedProtocol("HTTP/3 needs an https:// URL")
        timeouts = request.extensions.get("timeout", {})
        host = request.url.host
        port = request.url.port or 443
        client = await self._connection(host, port, timeouts.get("connect"))
        _, stream = await client.send_request(request)
        try:
            raw = await asyncio.wait_for(stream.headers, timeouts.get("read"))
        except TimeoutError as exc:
            raise httpx.ReadTimeout("HTTP/3 response headers timed out") from exc
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        for key, value in raw:
            if key == b":status":
                status = int(value)
            elif not key.startswith(b":"):
                headers.append((key, value))
        return httpx.Response(status, headers=headers, stream=_Body(stream, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/3"}, request=request)

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        for stack, client in connections:
            client.close()
            await close_quietly(stack)


async def close_quietly(stack: contextlib.AsyncExitStack) -> None:
    """Close a QUIC connection's exit stack, whatever it raises (the connection is being dropped)."""
    with contextlib.suppress(Exception):
        await stack.aclose()


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, body: httpx.AsyncByteStream, loop: asyncio.AbstractEventLoop) -> None:
        self.body = body.__aiter__()
        self.loop = loop

    def __iter__(self) -> Iterator[bytes]:
        while True:
            future = asyncio.run_coroutine_threadsafe(_next(self.body), self.loop)
            chunk = future.result()
            if chunk is None:
                return
            yield chunk


async def _next(body: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await body.__anext__()
    except StopAsyncIteration:
        return None


class Http3Transport(httpx.BaseTransport):
    """The synchronous face of :class:`AsyncHttp3Transport` (its event loop runs in a daemon thread)."""

    def __init__(self, cafile: Path | str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="omx-http3", daemon=True)
        self._thread.start()
        self._inner = AsyncHttp3Transport(cafile)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # A streamed upload's iterator is read on the helper loop while this thread waits.
        future = asyncio.run_coroutine_threadsafe(self._inner.handle_async_request(request), self._loop)
        response = future.result()
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers.raw,
                              stream=_SyncBody(response.stream, self._loop),
                              extensions=response.extensions, request=request)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._inner.aclose(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
