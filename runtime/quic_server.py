"""Hypercorn's HTTP/3 server, tuned for bulk transfers: the one place omx reaches into Hypercorn's QUIC code.

Hypercorn (0.17, 0.18) gives every QUIC connection aioquic's default
configuration and keeps at most 10 received datagrams waiting, dropping the
rest. Measured on loopback (bench/http3.py, a 64 MiB peer chunk), that held
HTTP/3 to about 1 MB/s: the server sent 1200-byte datagrams (one Python pass of
aioquic per 1200 bytes), and a client's burst overran the 10-datagram queue,
so aioquic's loss recovery shrank its window. Here:

* datagrams towards a loopback client are :data:`~omx.runtime.http3.LARGE_LOOPBACK_DATAGRAM`
  bytes, or the client's ``max_udp_payload_size`` transport parameter when smaller
  (:class:`LargeDatagramConnection`, which also splits what aioquic cannot frame past 16 KiB);
  elsewhere QUIC's 1200, which every path carries (aioquic does no path-MTU discovery): the
  configuration is chosen per connection by the client's address. Measured (bench/http3.py,
  a 64 MiB peer chunk to the qh3 peer client): 16 KiB datagrams 42-48 MB/s, 65,000-byte ones
  106-123 MB/s, the serving loop then idle more than half the time (py-spy);
* receive windows are 16 MiB per stream and 64 MiB per connection (aioquic: 1 MiB
  each), so an upload is not held waiting for window updates;
* up to :data:`DATAGRAM_QUEUE` received datagrams wait for the protocol instead of 10;
* at most :data:`MAX_CONNECTIONS` connections at once (Hypercorn sets no bound):
  a handshake past it is dropped;
* a connection's timer (pacing, ACK delay, loss detection) is an event-loop timer
  (``call_at``), as in aioquic's own asyncio protocol. Hypercorn restarts a task
  for it after every send, and a timer that fires and sends cancels its own task
  half-way, so sends the pacer had scheduled waited for the next incoming ACK:
  the measured round trip grew to 50-300 ms on loopback and the congestion window
  (3-6 MB in flight) was all that moved per round trip;
* a response body waits for room: Hypercorn hands every piece to aioquic at once,
  so a 64 MiB chunk sat whole in one stream's send buffer, and appending each
  1 MiB piece to it moved the whole buffer (a quarter of the serving loop's time,
  py-spy; aioquic drops acknowledged bytes from the front of a ``bytearray``, which
  moves the rest: 27 ms per MiB with 64 MiB held, 4 ms at 8, 1.3 at 2), and a
  client that never reads held that memory. The application's next piece now waits
  while the connection holds more than :data:`SEND_BUFFER` bytes unacknowledged
  (read from aioquic's stream send buffers); 4 MiB measured best of 2, 4, 8 and 64
  (below the congestion window, about 4 MB on loopback, the sender starves).

:func:`install` puts :class:`TunedUDPServer` where Hypercorn's asyncio worker
looks up the class it serves ``quic_bind`` sockets with
(``hypercorn.asyncio.run.UDPServer``). It checks that the names it replaces are
still there, so a Hypercorn release that moves them stops the start with a
clear error instead of serving untuned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
from typing import Any

import hypercorn.asyncio.run as hypercorn_run
import hypercorn.protocol.quic as hypercorn_quic
from aioquic.buffer import Buffer, size_uint_var  # type: ignore[attr-defined]  # re-exported from aioquic._buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header, pull_quic_transport_parameters
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.udp_server import UDPServer
from hypercorn.events import Event, RawData
from hypercorn.protocol.quic import QuicProtocol, _Connection
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr

from omx.runtime.http3 import LARGE_LOOPBACK_DATAGRAM, SAFE_DATAGRAM

__all__ = ["CONNECTION_WINDOW", "DATAGRAM_QUEUE", "MAX_CONNECTIONS", "SEND_BUFFER", "STREAM_WINDOW",
           "LargeDatagramConnection", "TunedQuicProtocol", "TunedUDPServer", "install"]

FRAME_DATA_MAX = 16383
"""aioquic writes a STREAM or CRYPTO frame's length as a 2-byte varint, so at most this many bytes each."""
_DEFAULT_UDP_PAYLOAD = 65527
"""RFC 9000's ``max_udp_payload_size`` for a peer that does not send the transport parameter."""

STREAM_WINDOW = 16 << 20
CONNECTION_WINDOW = 64 << 20
DATAGRAM_QUEUE = 1024
SEND_BUFFER = 4 << 20
"""Bytes a connection may hold unacknowledged before the application's next body piece waits."""
MAX_CONNECTIONS = 1024
"""QUIC connections served at once; a handshake past it is dropped. (aioquic lets each connection have
128 request streams open at once, more only as streams end.)"""


class _Capped:
    """A packet builder whose room for the next frame is at most ``cap`` bytes (all else delegated)."""

    def __init__(self, builder: Any, cap: int) -> None:
        self._builder = builder
        self._cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._builder, name)

    @property
    def remaining_flight_space(self) -> int:
        room: int = self._builder.remaining_flight_space
        return min(room, self._cap)


def _capped(builder: Any, cap: int) -> Any:
    return _Capped(builder, cap)


class LargeDatagramConnection(QuicConnection):
    """aioquic's connection able to send datagrams past 16 KiB, to a peer that takes them.

    aioquic writes one STREAM frame per stream per packet, its length a 2-byte varint
    (``push_uint16(length | 0x4000)``): a frame with 16 KiB or more data corrupts its own
    length field (a peer answers "unknown frame type" or "failed to parse frame"). Here a
    stream fills a packet with several frames of at most :data:`FRAME_DATA_MAX` bytes, CRYPTO
    frames keep under it too (so do the long-header packets carrying them, whose length field is
    2 bytes as well), and the datagram size drops to the peer's ``max_udp_payload_size``
    transport parameter when that is smaller (aioquic ignores it; absent, it is 65,527).
    """

    def _write_stream_frame(self, builder: Any, space: Any, stream: Any, max_offset: int) -> int:
        used = 0
        while not stream.sender.buffer_is_empty:
            offset = stream.sender.next_offset
            overhead = 3 + size_uint_var(stream.stream_id) + (size_uint_var(offset) if offset else 0)
            room = builder.remaining_flight_space
            used += super()._write_stream_frame(_capped(builder, FRAME_DATA_MAX + overhead), space, stream,
                                                max_offset)
            if builder.remaining_flight_space >= room:  # nothing written: no room, no credit or nothing due
                break
        return used

    def _write_crypto_frame(self, builder: Any, space: Any, stream: Any) -> bool:
        result: bool = super()._write_crypto_frame(_capped(builder, FRAME_DATA_MAX // 2), space, stream)
        return result

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        limit = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size or _DEFAULT_UDP_PAYLOAD
        if limit < self._max_datagram_size:
            self._max_datagram_size = max(limit, SAFE_DATAGRAM)
            self._loss._pacer._max_datagram_size = self._max_datagram_size


def _loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return (mapped or addr).is_loopback


def _held(connection: _Connection) -> int:
    """Bytes the connection's streams hold to send or to see acknowledged (aioquic's send buffers)."""
    return sum(len(stream.sender._buffer) for stream in connection.quic._streams.values())


class TunedQuicProtocol(QuicProtocol):
    """Hypercorn's QUIC protocol with a configuration per connection (see the module docstring)."""

    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        base: QuicConfiguration = self.quic_config
        base.max_data, base.max_stream_data = CONNECTION_WINDOW, STREAM_WINDOW
        base.max_datagram_size = SAFE_DATAGRAM
        self._remote = base
        self._local = dataclasses.replace(base, max_datagram_size=LARGE_LOOPBACK_DATAGRAM)
        self._loop = asyncio.get_running_loop()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._drained: dict[int, asyncio.Future[None]] = {}
        self._senders: dict[int, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData) and event.address is not None:
            if self._full(event.data):
                return
            # Read only when a datagram opens a connection: it then takes the client's configuration.
            self.quic_config = self._local if _loopback(str(event.address[0])) else self._remote
        await super().handle(event)

    def _full(self, data: bytes) -> bool:
        """True for a datagram that would open a connection past :attr:`max_connections` (it is dropped:
        the client's handshake times out, everyone connected is served as before)."""
        if len(self.connections) < self.max_connections:  # at least one connection id per connection
            return False
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return False
        if header.destination_cid in self.connections:
            return False
        return len({id(c) for c in self.connections.values()}) >= self.max_connections

    async def send_all(self, connection: _Connection) -> None:
        for data, address in connection.quic.datagrams_to_send(now=self.context.time()):
            await self.send(RawData(data=data, address=address))
        self._arm(connection)
        h3 = connection.h3
        if h3 is not None and h3.send is not self._senders.get(id(connection)):
            # The application's body pieces go through :meth:`_app_send`, which waits for room.
            self._senders[id(connection)] = h3.send = functools.partial(self._app_send, connection)
        waiter = self._drained.get(id(connection))
        if waiter is not None and (not connection.cids or _held(connection) <= SEND_BUFFER):
            del self._drained[id(connection)]
            if not waiter.done():
                waiter.set_result(None)
        if not connection.cids:
            self._senders.pop(id(connection), None)

    async def _app_send(self, connection: _Connection) -> None:
        """Send what the application wrote; then wait while the connection holds more than
        :data:`SEND_BUFFER` bytes not yet acknowledged (woken by :meth:`send_all` as ACKs arrive)."""
        await self.send_all(connection)
        while connection.cids and _held(connection) > SEND_BUFFER:
            waiter = self._drained.get(id(connection))
            if waiter is None:
                waiter = self._drained[id(connection)] = self._loop.create_future()
            await waiter

    def _arm(self, connection: _Connection) -> None:
        """Call :meth:`_due` at the connection's next timer (loss detection, pacing, ACK delay, idle)."""
        key = id(connection)
        previous = self._timers.pop(key, None)
        if previous is not None:
            previous.cancel()
        at = connection.quic.get_timer()
        if at is not None and connection.cids:
            self._timers[key] = self._loop.call_at(at, self._fire, connection)

    def _fire(self, connection: _Connection) -> None:
        self._timers.pop(id(connection), None)
        task = self._loop.create_task(self._due(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _due(self, connection: _Connection) -> None:
        if not connection.cids:  # terminated meanwhile
            return
        connection.quic.handle_timer(now=self.context.time())
        await self._handle_events(connection, None)


class TunedUDPServer(UDPServer):
    """Hypercorn's UDP server with a deeper datagram queue, serving :class:`TunedQuicProtocol`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol_queue = asyncio.Queue(DATAGRAM_QUEUE)

    async def run(self) -> None:
        # Hypercorn's own ``run`` with the tuned protocol class.
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        server = parse_socket_addr(sock.family, sock.getsockname())
        async with TaskGroup(self.loop) as task_group:
            self.protocol = TunedQuicProtocol(self.app, self.config, self.context, task_group,
                                              ConnectionState(self.state.copy()), server, self.protocol_send)
            try:
                while not self.context.terminated.is_set() or not self.protocol.idle:
                    event = await self.protocol_queue.get()
                    await self.protocol.handle(event)
            finally:
                self.transport.close()  # Hypercorn leaves its datagram transport open at shutdown


def install() -> None:
    """Make Hypercorn's asyncio worker serve QUIC with :class:`TunedUDPServer` (idempotent)."""
    current = getattr(hypercorn_run, "UDPServer", None)
    if current is TunedUDPServer:
        return
    if current is not UDPServer:
        raise RuntimeError("this Hypercorn release serves QUIC with another class than "
                           "hypercorn.asyncio.udp_server.UDPServer; omx's HTTP/3 tuning does not fit it")
    if getattr(hypercorn_quic, "QuicConnection", None) is not QuicConnection:
        raise RuntimeError("this Hypercorn release opens QUIC connections another way than "
                           "hypercorn.protocol.quic.QuicConnection; omx's HTTP/3 tuning does not fit it")
    hypercorn_quic.QuicConnection = LargeDatagramConnection  # type: ignore[attr-defined]
    hypercorn_run.UDPServer = TunedUDPServer  # type: ignore[attr-defined]
