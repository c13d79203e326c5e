"""omx's HTTP/3 server: QUIC on qh3 (its connection in Rust) under Hypercorn's ASGI streams.

Hypercorn (0.17, 0.18) serves QUIC with aioquic, whose connection is Python: its
per-packet work held a 64 MiB peer chunk to 89-151 MB/s on loopback, the serving
loop spending about 4 ms of CPU per MiB (py-spy), and it keeps at most 10 received
datagrams waiting. Here Hypercorn keeps the HTTP semantics (its ``HTTPStream`` runs
the ASGI app per request stream, as for HTTP/1.1) and qh3, aioquic's fork with the
QUIC connection, packet protection and HTTP/3 framing in Rust, does the rest:

* :class:`TunedQuicProtocol` takes the place of Hypercorn's QUIC protocol: it routes
  datagrams by connection id to qh3 ``QuicConnection`` objects and speaks HTTP/3 with
  qh3's ``H3Connection`` (:class:`~omx.runtime.quic_streams.H3Streams`, Hypercorn's
  ``H3Protocol`` on qh3, which also sends a file range from the file's pages);
* datagrams towards a loopback client are :data:`~omx.runtime.http3.LARGE_LOOPBACK_DATAGRAM`
  bytes, or the client's ``max_udp_payload_size`` transport parameter when smaller (qh3
  keeps to it); elsewhere QUIC's 1200, which every path carries: the configuration is
  chosen per connection by the client's address;
* receive windows are 16 MiB per stream and 64 MiB per connection, so an upload is not
  held waiting for window updates;
* up to :data:`DATAGRAM_QUEUE` received datagrams wait for the protocol instead of 10;
* at most :data:`MAX_CONNECTIONS` connections at once (Hypercorn sets no bound): a
  handshake past it is dropped; qh3 lets a client have 100 request streams open at once,
  more only as streams end;
* a connection's timer (pacing, ACK delay, loss detection) is an event-loop timer
  (``call_at``), as in qh3's own asyncio protocol (Hypercorn restarts a task for it
  after every send, and one that fires and sends cancels itself half-way, so sends the
  pacer had scheduled waited for the next ACK);
* a response body waits for room: the application's next piece waits while the
  connection holds more than :data:`SEND_BUFFER` bytes not yet sent (qh3's
  ``get_send_buffer_size``), so a client that never reads holds at most that, and what
  congestion control lets be in flight, of the node's memory;
* a client's first Initial gets a Retry (:meth:`TunedQuicProtocol._retry`);
* a new certificate (the node joined another cluster: its leaf is reissued under that
  cluster's CA) is taken for new connections without a restart: the files' identity is
  checked at each new connection (a ``stat`` each), and a pair that does not load yet
  (the key written, the certificate not yet) keeps the previous one;
* at a stop, connections with no request in progress close at once, the others as their
  last request ends: clients are told, and the serving loop ends (Hypercorn's waited for a
  datagram, so every stop took its 3 s graceful timeout).

:func:`install` puts :class:`TunedUDPServer` where Hypercorn's asyncio worker looks
up the class it serves ``quic_bind`` sockets with (``hypercorn.asyncio.run.UDPServer``).
It checks that the name it replaces is still there, so a Hypercorn release that moves
it stops the start with a clear error instead of serving another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.udp_server import UDPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.typing import AppWrapper, ConnectionState, WorkerContext
from hypercorn.utils import parse_socket_addr
from qh3._hazmat import Buffer
from qh3.h3.connection import H3_ALPN
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    ProtocolNegotiated,
)
from qh3.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from omx.runtime.http3 import LARGE_LOOPBACK_DATAGRAM, SAFE_DATAGRAM
from omx.runtime.quic_streams import H3Streams
from omx.runtime.quic_tokens import RetryTokens, files_stamp

__all__ = ["CONNECTION_WINDOW", "DATAGRAM_QUEUE", "MAX_CONNECTIONS", "SEND_BUFFER", "STREAM_WINDOW",
           "H3Streams", "RetryTokens", "TunedQuicProtocol", "TunedUDPServer", "install", "server_configurations"]

STREAM_WINDOW = 16 << 20
CONNECTION_WINDOW = 64 << 20
DATAGRAM_QUEUE = 1024
SEND_BUFFER = 4 << 20
"""Bytes a connection may hold not yet sent before the application's next body piece waits."""
MAX_CONNECTIONS = 1024
"""QUIC connections served at once; a handshake past it is dropped."""
log = logging.getLogger("omx.runtime.quic_server")

_CID_LENGTH = 8
_DATAGRAM_FRAME = 65536
"""qh3's HTTP/3 layer announces HTTP datagrams (``SETTINGS_H3_DATAGRAM``), which a client only accepts
with a ``max_datagram_frame_size`` transport parameter beside it."""


def _loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return (mapped or addr).is_loopback


def server_configurations(certfile: str, keyfile: str) -> tuple[QuicConfiguration, QuicConfiguration]:
    """The server's QUIC configurations: (towards loopback clients, towards all others)."""
    remote = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=False, max_data=CONNECTION_WINDOW,
                               max_stream_data=STREAM_WINDOW, max_datagram_size=SAFE_DATAGRAM,
                               connection_id_length=_CID_LENGTH, max_datagram_frame_size=_DATAGRAM_FRAME)
    remote.load_cert_chain(certfile=certfile, keyfile=keyfile)
    return dataclasses.replace(remote, max_datagram_size=LARGE_LOOPBACK_DATAGRAM), remote


@dataclasses.dataclass(eq=False)
class _Connection:
    quic: QuicConnection
    cids: set[bytes]
    client: tuple[str, int] | None
    h3: H3Streams | None = None
    timer: asyncio.TimerHandle | None = None
    drained: asyncio.Future[None] | None = None


class TunedQuicProtocol:
    """Hypercorn's QUIC protocol on qh3, with a configuration per connection (see the module docstring)."""

    max_connections = MAX_CONNECTIONS

    def __init__(self, app: AppWrapper, config: Config, context: WorkerContext, task_group: TaskGroup,
                 state: ConnectionState, server: tuple[str, int] | None,
                 send: Callable[[Event], Awaitable[None]]) -> None:
        self.app, self.config, self.context, self.task_group, self.state = app, config, context, task_group, state
        self.server = server
        self.send = send
        self.connections: dict[bytes, _Connection] = {}
        self.open = 0
        """Connections open (each is in :attr:`connections` under every connection id it has)."""
        self.serving: asyncio.Task[Any] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        """Datagrams go straight to it when set (else through ``send``, as Hypercorn's protocol does)."""
        self.wake: Callable[[], None] | None = None
        """Wakes the serving loop (to see that the last connection is gone while shutting down)."""
        """The task that feeds :meth:`handle`; it never waits for a response body's room."""
        self._stamp = files_stamp(str(config.certfile), str(config.keyfile))
        self._local, self._remote = server_configurations(str(config.certfile), str(config.keyfile))
        self._versions = self._remote.supported_versions
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tokens = RetryTokens()

    @property
    def idle(self) -> bool:
        return not self.connections

    def _reload_certificate(self) -> None:
        """Take the certificate files again when they were replaced (see the module docstring)."""
        certfile, keyfile = str(self.config.certfile), str(self.config.keyfile)
        stamp = files_stamp(certfile, keyfile)
        if stamp == self._stamp:
            return
        try:
            self._local, self._remote = server_configurations(certfile, keyfile)
        except (OSError, ValueError) as exc:  # half written: the next connection tries again
            log.debug("new certificate not loaded yet: %s", exc)
            return
        self._stamp = stamp
        log.info("HTTP/3 serves the new certificate %s", certfile)

    async def handle(self, event: Event) -> None:
        if isinstance(event, Closed) and self.context.terminated.is_set():
            await self.shutdown()
            return
        if not isinstance(event, RawData) or event.address is None:
            return
        data, address = event.data, event.address
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=_CID_LENGTH)
        except ValueError:
            return
        if header.version is not None and header.version not in self._versions:
            await self.send(RawData(data=encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=self._versions), address=address))
            return
        connection = self.connections.get(header.destination_cid)
        if connection is None:
            if (len(data) < 1200 or header.packet_type != QuicPacketType.INITIAL
                    or self.context.terminated.is_set() or self.open >= self.max_connections):
                return
            if not header.token:
                await self._retry(header.version or self._versions[0], header.destination_cid,
                                  header.source_cid, address)
                return
            try:
                original_cid, retry_cid = self._tokens.validate_token(address, header.token)
            except ValueError:
                return
            self._reload_certificate()
            configuration = self._local if _loopback(str(address[0])) else self._remote
            quic = QuicConnection(configuration=configuration, original_destination_connection_id=original_cid,
                                  retry_source_connection_id=retry_cid)
            connection = _Connection(quic, {header.destination_cid, quic.host_cid}, address)
            for cid in connection.cids:
                self.connections[cid] = connection
            self.open += 1
        try:
            connection.quic.receive_datagram(data, address, now=self.context.time())
            await self._handle_events(connection)
        except QuicConnectionError as exc:
            self._fail(connection, exc)

    async def _retry(self, version: int, original_cid: bytes, client_cid: bytes, address: Any) -> None:
        """Answer a first Initial with a Retry: the client's next one carries a token proving its address.

        Nothing is kept for a client until then (a forged source address costs one datagram), and the
        address counts as validated, so the server's first flight is not held to 3x what the client sent
        (qh3 2.1's server fails a handshake with ``packet builder capacity exhausted`` at that limit
        when the client's first flight is one 1200-byte datagram, as aioquic's is)."""
        retry_cid = os.urandom(_CID_LENGTH)
        await self.send(RawData(data=encode_quic_retry(
            version=version, source_cid=retry_cid, destination_cid=client_cid,
            original_destination_cid=original_cid,
            retry_token=self._tokens.create_token(address, original_cid, retry_cid)), address=address))

    def _fail(self, connection: _Connection, exc: Exception) -> None:
        """Drop a connection qh3 failed on (the others are served on)."""
        log.warning("HTTP/3 connection from %s dropped: %s", connection.client, exc)
        with contextlib.suppress(Exception):
            connection.quic.close(error_code=QuicErrorCode.INTERNAL_ERROR)
        self._forget(connection)

    async def _handle_events(self, connection: _Connection) -> None:
        while (event := connection.quic.next_event()) is not None:
            if isinstance(event, ConnectionTerminated):
                self._forget(connection)
            elif isinstance(event, ProtocolNegotiated):
                connection.h3 = H3Streams(self.app, self.config, self.context, self.task_group, self.state,
                                          connection.client, self.server, connection.quic,
                                          partial(self._app_send, connection), partial(self._close, connection))
            elif isinstance(event, ConnectionIdIssued):
                connection.cids.add(event.connection_id)
                self.connections[event.connection_id] = connection
            elif isinstance(event, ConnectionIdRetired):
                connection.cids.discard(event.connection_id)
                self.connections.pop(event.connection_id, None)
            if connection.h3 is not None:
                await connection.h3.handle(event)
        await self.send_all(connection)

    def _forget(self, connection: _Connection) -> None:
        if not connection.cids:
            return
        for cid in connection.cids:
            self.connections.pop(cid, None)
        connection.cids = set()
        self.open -= 1
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        if not self.connections and self.context.terminated.is_set() and self.wake is not None:
            self.wake()  # the serving loop ends once it sees no connection left

    async def shutdown(self) -> None:
        """The server is stopping: close every connection with no request in progress now, the others
        as their last request ends (Hypercorn's graceful timeout bounds the wait). A client is told at once,
        and the serving loop ends without waiting for connections to time out."""
        for connection in {id(c): c for c in self.connections.values()}.values():
            if connection.h3 is None or not connection.h3.streams:
                await self._close(connection)

    async def _close(self, connection: _Connection) -> None:
        if not connection.cids:
            return
        connection.quic.close(error_code=QuicErrorCode.NO_ERROR)
        await self.send_all(connection)
        self._forget(connection)

    def stop(self) -> None:
        """Cancel every connection's timer (the socket is closing)."""
        for connection in self.connections.values():
            if connection.timer is not None:
                connection.timer.cancel()
                connection.timer = None

    async def send_all(self, connection: _Connection) -> None:
        quic = connection.quic
        datagrams = quic.datagrams_to_send(now=self.context.time())
        if self.transport is not None:
            if self.transport.is_closing():
                return
            sendto = self.transport.sendto
            for data, address in datagrams:
                sendto(data, address)
        else:
            for data, address in datagrams:
                await self.send(RawData(data=data, address=address))
        self._arm(connection)
        waiter = connection.drained
        if waiter is not None and (not connection.cids or quic.get_send_buffer_size() <= SEND_BUFFER):
            connection.drained = None
            if not waiter.done():
                waiter.set_result(None)

    async def _app_send(self, connection: _Connection) -> None:
        """Send what the application wrote; then wait while the connection holds more than
        :data:`SEND_BUFFER` bytes not yet sent (woken by :meth:`send_all` as ACKs open the window)."""
        await self.send_all(connection)
        if asyncio.current_task() is self.serving:  # an answer written while a datagram is handled
            return
        while connection.cids and connection.quic.get_send_buffer_size() > SEND_BUFFER:
            if connection.drained is None:
                connection.drained = self._loop.create_future()
            await connection.drained

    def _arm(self, connection: _Connection) -> None:
        """Call :meth:`_due` at the connection's next timer (loss detection, pacing, ACK delay, idle)."""
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        at = connection.quic.get_timer()
        if at is not None and connection.cids:
            connection.timer = self._loop.call_at(at, self._fire, connection)

    def _fire(self, connection: _Connection) -> None:
        connection.timer = None
        task = self._loop.create_task(self._due(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _due(self, connection: _Connection) -> None:
        if not connection.cids:  # terminated meanwhile
            return
        try:
            connection.quic.handle_timer(now=self.context.time())
            await self._handle_events(connection)
        except QuicConnectionError as exc:
            self._fail(connection, exc)


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
            protocol = TunedQuicProtocol(self.app, self.config, self.context, task_group,
                                         ConnectionState(self.state.copy()), server, self.protocol_send)
            protocol.serving, protocol.transport = asyncio.current_task(), self.transport
            protocol.wake = self._wake
            self.protocol = protocol  # type: ignore[assignment]
            watch = asyncio.create_task(self._watch())
            try:
                while not self.context.terminated.is_set() or not protocol.idle:
                    event = await self.protocol_queue.get()
                    await protocol.handle(event)
            finally:
                watch.cancel()
                protocol.stop()
                self.transport.close()  # Hypercorn leaves its datagram transport open at shutdown

    async def _watch(self) -> None:
        """Hand the protocol a ``Closed`` event when the server terminates (its loop may be waiting for a
        datagram that never comes: Hypercorn's own waits its graceful timeout, 3 s, for every stop)."""
        await self.context.terminated.wait()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # the loop has datagrams to handle: it runs anyway
            self.protocol_queue.put_nowait(Closed())


def install() -> None:
    """Make Hypercorn's asyncio worker serve QUIC with :class:`TunedUDPServer` (idempotent)."""
    current = getattr(hypercorn_run, "UDPServer", None)
    if current is TunedUDPServer:
        return
    if current is not UDPServer:
        raise RuntimeError("this Hypercorn release serves QUIC with another class than "
                           "hypercorn.asyncio.udp_server.UDPServer; omx's HTTP/3 server does not fit it")
    hypercorn_run.UDPServer = TunedUDPServer  # type: ignore[attr-defined]
