"""A file range answered over HTTP/3 is sent from the file's pages (the zero-copy send extension), intact.

One Hypercorn server with omx's HTTP/3 layer (:mod:`omx.runtime.quic_streams`) serves a small ASGI app
that answers :class:`~omx.runtime.file_response.FileRangeResponse` for ranges of one file; omx's peer
client reads them over QUIC (receiving each datagram with ``recvfrom``, :func:`~omx.runtime.http3.receive_plainly`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qh3.asyncio._transport import OptimizedDatagramTransport, create_optimized_datagram_transport

from omx.functions.registry import FileRange
from omx.runtime.file_response import FileRangeResponse
from omx.runtime.http3 import _PlainReceiving, receive_plainly
from omx.runtime.peer.h3 import H3PeerClient
from omx.runtime.peer.wire import WireError
from omx.runtime.quic_streams import ZEROCOPY
from tests.support.h3_app import served_over_h3

SIZE = 5 * (1 << 20) + 4321


class Served:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.extensions: list[set[str]] = []
        self.sent: list[int] = []
        self.errors: list[str] = []
        self.ended = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        offset, _, length = scope["query_string"].decode().partition("-")
        self.extensions.append(set(scope["extensions"]))
        rng = FileRange.open(self.path, int(offset), int(length), on_sent=self.sent.append)
        try:
            await FileRangeResponse(rng, {})(scope, receive, send)
        except OSError as exc:  # kept from the server's log: its traceback is not what these tests read
            self.errors.append(str(exc))
        finally:
            self.ended += 1


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Served, H3PeerClient, str, bytes]]:
    data = os.urandom(SIZE)
    (tmp_path / "blob").write_bytes(data)
    app = Served(tmp_path / "blob")
    async with served_over_h3(app, tmp_path / "tls", "omx-files") as h3:
        yield app, h3.client, h3.address, data


async def test_a_file_range_is_sent_from_the_file_intact(served: tuple[Served, H3PeerClient, str, bytes]) -> None:
    app, client, address, data = served
    for offset, length in ((0, SIZE), (12345, 3 * (1 << 20) + 17), (SIZE - 1, 1)):
        answer = await client.get(address, f"/?{offset}-{length}", {}, max_body=length, timeout=30)
        assert answer.status == 200
        assert bytes(answer.body) == data[offset:offset + length]
    assert all(ZEROCOPY in offered for offered in app.extensions)
    assert app.sent == [SIZE, 3 * (1 << 20) + 17, 1]
    (_, conn), = client._connections.values()
    assert isinstance(conn._transport, _PlainReceiving)  # the client read those datagrams with recvfrom


async def test_only_qh3s_own_transport_towards_loopback_is_made_to_receive_plainly() -> None:
    class Protocol(asyncio.DatagramProtocol):
        def datagrams_received(self, data: list[bytes], addr: Any) -> None:
            pass

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    transport, _ = await create_optimized_datagram_transport(asyncio.get_running_loop(), Protocol, sock=sock)
    try:
        assert not receive_plainly(object(), "127.0.0.1")
        assert not receive_plainly(transport, "10.0.0.5")  # 1200-byte datagrams: qh3's recvmmsg stays
        assert type(transport) is OptimizedDatagramTransport
        assert receive_plainly(transport, "127.0.0.1")
        assert isinstance(transport, _PlainReceiving)
    finally:
        transport.close()


async def test_a_range_past_the_files_end_fails_and_the_server_serves_on(
        served: tuple[Served, H3PeerClient, str, bytes]) -> None:
    app, client, address, data = served
    with pytest.raises(WireError, match="reset"):  # at once, not at the timeout
        await client.get(address, f"/?{SIZE - 10}-100", {}, max_body=100, timeout=60)
    assert app.errors and "100 bytes" in app.errors[0]
    answer = await client.get(address, f"/?0-{SIZE}", {}, max_body=SIZE, timeout=30)
    assert bytes(answer.body) == data
    assert app.sent[-1] == SIZE


async def test_a_file_transfer_the_client_gives_up_ends(served: tuple[Served, H3PeerClient, str, bytes]) -> None:
    app, client, address, data = served
    answer = await client.request(address, "GET", f"/?0-{SIZE}", {}, b"", head_timeout=10)
    async for _ in answer.chunks():
        break
    await answer.aclose()
    for _ in range(200):
        if app.ended:
            break
        await asyncio.sleep(0.05)
    assert app.ended == 1, "the response went on waiting to send a stream the client reset"
    again = await client.get(address, "/?7-1000", {}, max_body=1000, timeout=10)
    assert bytes(again.body) == data[7:1007]
