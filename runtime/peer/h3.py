"""HTTP/3 for peer traffic: chunk downloads and forwarded calls over QUIC, verified against the cluster CA.

With ``peer.transport: http3`` a node reaches its peers on their HTTP/3
listeners (the ``h3`` Serf tag, on the API's address) instead of their TCP
ports. :class:`H3PeerClient` keeps one QUIC connection per peer address and
sends each request on a stream of its own, so a transfer's chunks in flight
share one connection. Its QUIC stack is qh3, aioquic's fork with the connection
and packet protection in Rust: receiving a 64 MiB chunk from a node cost the
client 2.5x less CPU than with aioquic, which was the bound on loopback
(bench/http3.py: 79 -> 104 MB/s). qh3 verifies the chain with rustls. The server's certificate must chain to the
cluster CA (``$OMX_HOME/tls/ca.crt``, derived from the cluster secret) and
name the address dialled; requests are HMAC-signed like every peer request,
so the CA proves the peer and the signature proves this node.

It offers the faces of the two HTTP/1.1 peer clients:

* :meth:`H3PeerClient.get`, :class:`~omx.runtime.peer.wire.WireClient`'s: a
  ``Content-Length`` answer received whole, into the caller's buffer when the
  sizes match (chunk downloads, through
  :class:`~omx.runtime.peer.transport.HttpPeerTransport`);
* :meth:`H3PeerClient.request`, :class:`~omx.runtime.cluster.peer_http.PeerHttp`'s:
  the answer's head, then its body in the pieces that arrive (forwarded calls).

Every failure on the wire (no answer, untrusted certificate, connection lost,
an answer longer than announced) raises :class:`~omx.runtime.peer.wire.WireError`.
Flow-control windows are larger than aioquic's 1 MiB defaults so a whole chunk
can be in flight without waiting for window updates; datagrams are large
towards loopback (:func:`omx.runtime.http3.datagram_size`), and the window per
stream is smaller there (:data:`LOOPBACK_STREAM_WINDOW`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from qh3.asyncio.client import connect
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.h3.connection import H3_ALPN, H3Connection
from qh3.h3.events import DataReceived, H3Event, HeadersReceived, StreamReset
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.events import ConnectionTerminated, QuicEvent

from omx.runtime.http3 import (
    SAFE_DATAGRAM,
    advertise_datagram_size,
    close_quietly,
    datagram_size,
    enlarge_buffers,
    receive_plainly,
)
from omx.runtime.peer.wire import WireError, WireResponse

__all__ = ["STREAM_WINDOW", "CONNECTION_WINDOW", "LOOPBACK_STREAM_WINDOW", "H3PeerClient", "H3PeerResponse"]

STREAM_WINDOW = 16 << 20
"""Receive window per stream: a default 8 MiB chunk fits in flight whole."""
CONNECTION_WINDOW = 64 << 20
"""Receive window per connection: several chunks in flight at once (``models.concurrency``)."""
LOOPBACK_STREAM_WINDOW = 4 << 20
"""Receive window per stream towards a loopback peer, where the round trip is short and CPU bounds the transfer.

The serving node (qh3) keeps a stream's unacknowledged and queued bytes in one buffer that doubles as it
fills: with 16 MiB in flight it grew 8 -> 16 -> 32 MiB for each 64 MiB chunk, past glibc's largest
``mmap`` threshold, so every chunk mapped it afresh and faulted it in page by page (about 110 page faults
per MiB, a sixth of the serving node's CPU in ``perf``). With 4 MiB it stays on the heap and is reused:
1-6 faults per MiB."""


class _Unanswered(WireError):
    """The connection closed before this request's answer began (on a reused one: send it again)."""


class _Stream:
    """One request's answer as the connection delivers it."""

    def __init__(self, into: bytearray | memoryview | None, max_body: int | None) -> None:
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.collect = max_body is not None
        """:meth:`H3PeerClient.get`: the body lands in :attr:`body` (sized from Content-Length)."""
        self.max_body = max_body or 0
        self.into = into
        self.body: bytearray | memoryview = bytearray()
        self.pos = 0
        self.pieces: deque[bytes] = deque()
        self.ended = False
        self.error: WireError | None = None
        self.wake = asyncio.Event()

    def fail(self, error: WireError) -> None:
        if self.error is None and not self.ended:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
        self.wake.set()

    def headers_received(self, raw: list[tuple[bytes, bytes]]) -> None:
        for key, value in raw:
            if key == b":status":
                self.status = int(value) if value.isdigit() else 0
            elif not key.startswith(b":"):
                self.headers[key.decode("latin-1")] = value.decode("latin-1")
        if self.collect:
            length = self.headers.get("content-length", "")
            if not length.isdigit():
                raise WireError("the peer's response has no Content-Length")
            size = int(length)
            if size > self.max_body:
                raise WireError(f"the peer's response is {size} bytes, more than the {self.max_body} expected")
            # A reused buffer is warm: no page faults and no zeroing for every chunk received.
            self.body = self.into if self.into is not None and len(self.into) == size else bytearray(size)
        if not self.head.done():
            self.head.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.collect:
            self.pieces.append(data)
            self.wake.set()
            return
        end = self.pos + len(data)
        if end > len(self.body):
            raise WireError("the peer sent more than its Content-Length")
        self.body[self.pos:end] = data
        self.pos = end

    def end(self) -> None:
        if not self.head.done():
            raise WireError("the peer ended its answer without a head")
        if self.collect and self.pos != len(self.body):
            raise WireError(f"the peer sent {self.pos} of {len(self.body)} bytes")
        self.ended = True
        self.wake.set()


class _Connection(QuicConnectionProtocol):
    """One QUIC connection speaking HTTP/3; events go to the stream they belong to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        advertise_datagram_size(self._quic)
        self.h3 = H3Connection(self._quic)
        self.streams: dict[int, _Stream] = {}
        self.closed: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.closed = event.reason_phrase or f"error {event.error_code}"
            for stream in self.streams.values():
                kind = WireError if stream.head.done() else _Unanswered
                stream.fail(kind(f"HTTP/3 connection closed: {self.closed}"))
            self.streams.clear()
            return
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        stream_id: int = getattr(event, "stream_id", -1)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        try:
            if isinstance(event, HeadersReceived):
                if not stream.head.done():
                    stream.headers_received(list(event.headers))
            elif isinstance(event, DataReceived) and event.data:
                stream.data_received(event.data)
            elif isinstance(event, StreamReset):
                raise WireError(f"the peer reset the stream (error {event.error_code})")
            if getattr(event, "stream_ended", False):
                self.streams.pop(stream_id, None)
                stream.end()
        except WireError as exc:
            self.streams.pop(stream_id, None)
            stream.fail(exc)
            self.reset(stream_id)

    def reset(self, stream_id: int) -> None:
        """Give up a stream: the peer stops sending it (the connection lives on)."""
        self.streams.pop(stream_id, None)
        with contextlib.suppress(Exception):  # already closed or reset
            self._quic.stop_stream(stream_id, 0x10C)  # H3_REQUEST_CANCELLED
            self._quic.reset_stream(stream_id, 0x10C)
        self.transmit()

    def send(self, method: str, authority: str, target: str, headers: Mapping[str, str], body: bytes,
             stream: _Stream) -> int:
        if self.closed is not None:
            raise _Unanswered(f"HTTP/3 connection closed: {self.closed}")
        stream_id = self._quic.get_next_available_stream_id()
        self.streams[stream_id] = stream
        fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()),
                  (b":path", target.encode())]
        fields += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
        if body:
            fields.append((b"content-length", str(len(body)).encode()))
        self.h3.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.transmit()
        return stream_id


class H3PeerResponse:
    """An answer whose body is still arriving: read :meth:`chunks` to the end or :meth:`aclose` it."""

    def __init__(self, conn: _Connection, stream_id: int, stream: _Stream, read_timeout: float) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._stream = stream
        self._read_timeout = read_timeout
        self.status = stream.status
        self.headers = stream.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive; raises :class:`WireError` when the answer breaks off."""
        stream = self._stream
        while True:
            while stream.pieces:
                yield stream.pieces.popleft()
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                return
            stream.wake.clear()
            try:
                async with asyncio.timeout(self._read_timeout):
                    await stream.wake.wait()
            except TimeoutError as exc:
                await self.aclose()
                raise WireError(f"no more of the answer within {self._read_timeout}s") from exc

    async def aclose(self) -> None:
        """Cancel the stream unless its body was read to the end."""
        if not self._stream.ended:
            self._conn.reset(self._stream_id)


class H3PeerClient:
    """HTTP/3 requests to peers by ``host:port``, trusting only the CA in ``cafile`` (see the module docstring)."""

    transport = "h3"
    """The label of this client's bytes in ``omx_peer_bytes_total``."""

    def __init__(self, cafile: Path | str, *, connect_timeout: float = 5.0,
                 stream_window: int = STREAM_WINDOW, connection_window: int = CONNECTION_WINDOW) -> None:
        self.cafile = str(cafile)
        self.connect_timeout = connect_timeout
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._connections: dict[str, tuple[contextlib.AsyncExitStack, _Connection]] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    def _config(self, host: str) -> QuicConfiguration:
        size = datagram_size(host)
        window = min(self.stream_window, LOOPBACK_STREAM_WINDOW) if size > SAFE_DATAGRAM else self.stream_window
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=host,
                                   max_datagram_size=size, max_data=self.connection_window, max_stream_data=window)
        try:
            config.load_verify_locations(cafile=self.cafile)
        except OSError as exc:
            raise WireError(f"cannot read the cluster CA {self.cafile}: {exc.strerror or exc}") from exc
        return config

    async def _connection(self, address: str) -> tuple[_Connection, bool]:
        """The connection to ``address``, and whether it was opened before (reused)."""
        if self._closed:
            raise WireError("the peer client is closed")
        async with self._lock:
            known = self._connections.get(address)
            if known is not None and known[1].closed is None:
                return known[1], True
            if known is not None:
                self._connections.pop(address)
                await close_quietly(known[0])
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            stack = contextlib.AsyncExitStack()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await stack.enter_async_context(connect(
                        host, int(port), configuration=self._config(host), create_protocol=_Connection))
            except TimeoutError as exc:
                await close_quietly(stack)
                raise WireError(f"no HTTP/3 answer from {address} within {self.connect_timeout}s (is its "
                                f"certificate from this cluster's CA?)") from exc
            except (ConnectionError, OSError, ValueError) as exc:
                await close_quietly(stack)
                raise WireError(f"HTTP/3 connection to {address} failed: {exc}") from exc
            assert isinstance(conn, _Connection)
            if conn._transport is not None:
                enlarge_buffers(conn._transport.get_extra_info("socket"))
                receive_plainly(conn._transport, host)
            self._connections[address] = (stack, conn)
            return conn, False

    async def get(self, address: str, target: str, headers: dict[str, str], *, max_body: int,
                  timeout: float,  # noqa: ASYNC109 - a per-request deadline
                  into: bytearray | memoryview | None = None) -> WireResponse:
        """GET ``target`` from ``address`` (see :meth:`omx.runtime.peer.wire.WireClient.get`).

        A request on a reused connection that closed before answering (its idle timeout) is sent
        again on a fresh one, as :class:`~omx.runtime.peer.wire.WireClient` does."""
        for attempt in (0, 1):
            conn, reused = await self._connection(address)
            try:
                return await self._get(conn, address, target, headers, max_body, timeout, into)
            except _Unanswered:
                if not reused or attempt:
                    raise
        raise WireError(f"GET {target} from {address} failed")  # pragma: no cover - the loop returns or raises

    async def _get(self, conn: _Connection, address: str, target: str, headers: dict[str, str], max_body: int,
                   timeout: float,  # noqa: ASYNC109 - a per-request deadline
                   into: bytearray | memoryview | None) -> WireResponse:
        stream = _Stream(into, max_body)
        stream_id = conn.send("GET", address, target, headers, b"", stream)
        try:
            async with asyncio.timeout(timeout):
                while not stream.ended:
                    if stream.error is not None:
                        raise stream.error
                    stream.wake.clear()
                    await stream.wake.wait()
        except TimeoutError as exc:
            conn.reset(stream_id)
            raise WireError(f"GET {target} from {address} timed out after {timeout}s") from exc
        except BaseException:
            conn.reset(stream_id)  # nothing writes to ``into`` once this returns
            raise
        return WireResponse(stream.status, stream.headers, stream.body)

    async def request(self, address: str, method: str, target: str, headers: Mapping[str, str], body: bytes, *,
                      head_timeout: float, read_timeout: float | None = None) -> H3PeerResponse:
        """Send a request; return once the answer's head arrived (its body is read from the response).

        Sent again on a fresh connection when a reused one closed before any answer, as
        :class:`~omx.runtime.cluster.peer_http.PeerHttp` does."""
        for attempt in (0, 1):
            conn, reused = await self._connection(address)
            stream = _Stream(None, None)
            try:
                stream_id = conn.send(method, address, target, headers, body, stream)
                try:
                    async with asyncio.timeout(head_timeout):
                        await stream.head
                except TimeoutError as exc:
                    conn.reset(stream_id)
                    raise WireError(f"no answer from {address} within {head_timeout}s") from exc
                except BaseException:
                    conn.reset(stream_id)
                    raise
            except _Unanswered:
                if not reused or attempt:
                    raise
                continue
            return H3PeerResponse(conn, stream_id, stream, head_timeout if read_timeout is None else read_timeout)
        raise WireError(f"{method} {target} to {address} failed")  # pragma: no cover - the loop returns or raises

    async def aclose(self) -> None:
        self._closed = True
        connections, self._connections = list(self._connections.values()), {}
        for stack, conn in connections:
            conn.close()
            await close_quietly(stack)
