"""Datagrams past 16 KiB between omx's QUIC server configuration and its peer client (both qh3), in memory.

The server sends :data:`~omx.runtime.http3.LARGE_LOOPBACK_DATAGRAM`-byte datagrams to a loopback client
and keeps to the client's ``max_udp_payload_size``, which omx's peer client advertises as its datagram
size (qh3 says 1472). The peer client's window per stream is smaller towards loopback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qh3._hazmat import Buffer
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.events import HandshakeCompleted, StreamDataReceived
from qh3.quic.packet import pull_quic_header

from omx.mesh import ClusterSecret
from omx.runtime.http3 import LARGE_LOOPBACK_DATAGRAM, advertise_datagram_size
from omx.runtime.quic_server import RetryTokens, server_configurations
from omx.runtime.tls import ensure_tls

CLIENT = ("127.0.0.1", 50001)
SERVER = ("127.0.0.1", 50002)


def transfer(tmp_path: Path, *, advertise: bool, size: int = 300_000) -> tuple[bytes, bytes, list[int]]:
    """The client asks on a stream, the server answers ``size`` bytes: (sent, received, 1-RTT datagram sizes)."""
    files = ensure_tls(tmp_path, ClusterSecret.generate(), "omx-a", ["127.0.0.1"])
    client_config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="127.0.0.1",
                                      max_datagram_size=LARGE_LOOPBACK_DATAGRAM)
    client_config.load_verify_locations(cafile=str(files.ca_cert))
    client = QuicConnection(configuration=client_config)
    if advertise:
        advertise_datagram_size(client)
    server_config, _ = server_configurations(str(files.cert), str(files.key))
    now = 1.0
    client.connect(SERVER, now=now)
    first = client.datagrams_to_send(now=now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = QuicConnection(configuration=server_config, original_destination_connection_id=header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT, now=now)
    sent = os.urandom(size)
    received = bytearray()
    sizes: list[int] = []
    connected = False
    for _ in range(2000):
        now += 0.001
        for data, _ in server.datagrams_to_send(now=now):
            if connected:
                sizes.append(len(data))
            client.receive_datagram(data, SERVER, now=now)
        while (event := client.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                received += event.data
                if event.end_stream:
                    return sent, bytes(received), sizes
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT, now=now)
        while (server_event := server.next_event()) is not None:
            if isinstance(server_event, HandshakeCompleted) and not connected:
                connected = True
                client.send_stream_data(client.get_next_available_stream_id(), b"GET", end_stream=True)
            elif isinstance(server_event, StreamDataReceived) and server_event.end_stream:
                server.send_stream_data(server_event.stream_id, sent, end_stream=True)
    raise AssertionError(f"the answer did not arrive: {len(received)} of {size} bytes")


def test_large_datagrams_carry_a_stream_intact(tmp_path: Path) -> None:
    sent, received, sizes = transfer(tmp_path, advertise=True)
    assert received == sent
    assert max(sizes) > 2 * 16384
    assert max(sizes) <= LARGE_LOOPBACK_DATAGRAM


def test_server_keeps_to_the_clients_max_udp_payload_size(tmp_path: Path) -> None:
    sent, received, sizes = transfer(tmp_path, advertise=False)  # qh3 as it comes: 1472
    assert received == sent
    assert sizes and max(sizes) <= 1472


def test_retry_tokens_hold_only_for_the_address_they_were_made_for() -> None:
    tokens = RetryTokens()
    token = tokens.create_token(("127.0.0.1", 5000), b"original", b"retry-id")
    assert tokens.validate_token(("127.0.0.1", 5000), token) == (b"original", b"retry-id")
    for address, bad in ((("127.0.0.1", 5001), token), (("127.0.0.2", 5000), token),
                         (("127.0.0.1", 5000), token[:-1] + bytes([token[-1] ^ 1])),
                         (("127.0.0.1", 5000), b""),
                         (("127.0.0.1", 5000), RetryTokens().create_token(("127.0.0.1", 5000), b"o", b"r"))):
        with pytest.raises(ValueError):
            tokens.validate_token(address, bad)
    tokens.lifetime = -1.0
    with pytest.raises(ValueError, match="expired"):
        tokens.validate_token(("127.0.0.1", 5000), token)


def test_peer_client_window_per_stream_is_small_only_on_loopback(tmp_path: Path) -> None:
    from omx.runtime.peer.h3 import LOOPBACK_STREAM_WINDOW, STREAM_WINDOW, H3PeerClient

    tls = ensure_tls(tmp_path, ClusterSecret.generate(), "omx-a", ["127.0.0.1"])
    client = H3PeerClient(tls.ca_cert)
    assert LOOPBACK_STREAM_WINDOW < STREAM_WINDOW
    assert client._config("127.0.0.1").max_stream_data == LOOPBACK_STREAM_WINDOW
    assert client._config("::1").max_stream_data == LOOPBACK_STREAM_WINDOW
    assert client._config("10.0.0.5").max_stream_data == STREAM_WINDOW
    assert H3PeerClient(tls.ca_cert, stream_window=1 << 20)._config("127.0.0.1").max_stream_data == 1 << 20
