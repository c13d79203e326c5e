"""The lean forwarding client against scripted HTTP/1.1 servers on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from omx.runtime.cluster.peer_http import PeerHttp, PeerHttpError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on 127.0.0.1 running ``handler`` per connection; yields its address and a connection count."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", connections
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def read_body(client: PeerHttp, address: str, body: bytes = b"{}") -> tuple[int, list[bytes]]:
    response = await client.request(address, "POST", "/api/generate?x=1", {"X-Test": "1"}, body, head_timeout=5)
    return response.status, [piece async for piece in response.chunks()]


async def test_a_chunked_answer_comes_piece_by_piece_on_a_kept_alive_connection() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            writer.write(chunked(b'{"a":1}\n', b'{"b":2}\n'))
            await writer.drain()

    async with server(handler) as (address, connections):
        client = PeerHttp()
        for _ in range(3):
            assert await read_body(client, address, b'{"model":"m"}') == (200, [b'{"a":1}\n', b'{"b":2}\n'])
        await client.aclose()
    assert len(connections) == 1
    head, body = seen[0]
    assert head.startswith(b"POST /api/generate?x=1 HTTP/1.1\r\n") and b"X-Test: 1" in head
    assert body == b'{"model":"m"}'


async def test_a_content_length_answer_and_its_headers() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 404 Not Found\r\nX-Omx-Node: omx-b\r\nContent-Length: 11\r\n\r\n{\"error\":1}")
        await writer.drain()

    async with server(handler) as (address, _):
        client = PeerHttp()
        response = await client.request(address, "GET", "/x", {}, b"", head_timeout=5)
        assert response.status == 404 and response.headers["x-omx-node"] == "omx-b"
        assert b"".join([p async for p in response.chunks()]) == b'{"error":1}'
        await client.aclose()


async def test_a_reused_connection_the_peer_closed_is_replaced_without_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # ...and then close it, as a keep-alive timeout does

    async with server(handler) as (address, connections):
        client = PeerHttp()
        assert await read_body(client, address) == (200, [b"ok"])
        await asyncio.sleep(0.05)
        assert await read_body(client, address) == (200, [b"ok"])
        await client.aclose()
    assert len(connections) == 2


async def test_a_request_the_peer_drops_unanswered_on_a_reused_connection_is_sent_again() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next one is dropped unanswered (a keep-alive timeout racing it)

    async with server(handler) as (address, connections):
        client = PeerHttp()
        assert await read_body(client, address) == (200, [b"ok"])
        assert await read_body(client, address) == (200, [b"ok"])
        await client.aclose()
    assert len(connections) == 2


async def test_a_broken_chunked_answer_raises_and_drops_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"a\":1}\n\r\n5\r\nab")
        await writer.drain()

    async with server(handler) as (address, _):
        client = PeerHttp()
        response = await client.request(address, "POST", "/", {}, b"", head_timeout=5)
        pieces = response.chunks()
        assert await pieces.__anext__() == b'{"a":1}\n'
        with pytest.raises(PeerHttpError):
            await pieces.__anext__()
        await client.aclose()


async def test_closing_an_unfinished_answer_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await reader.read()  # returns once the client hung up
        closed.set()

    async with server(handler) as (address, connections):
        client = PeerHttp()
        response = await client.request(address, "POST", "/", {}, b"", head_timeout=5)
        assert await response.chunks().__anext__() == b"hi"
        await response.aclose()
        await asyncio.wait_for(closed.wait(), 5)
        again = await client.request(address, "POST", "/", {}, b"", head_timeout=5)  # on a new connection
        assert await again.chunks().__anext__() == b"hi"
        await again.aclose()
        await client.aclose()
    assert len(connections) == 2


async def test_refused_silent_and_malformed_peers_are_errors() -> None:
    client = PeerHttp(connect_timeout=2)
    with pytest.raises(PeerHttpError, match="cannot connect"):
        await client.request("127.0.0.1:9", "GET", "/", {}, b"", head_timeout=1)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with server(silent) as (address, _):
        with pytest.raises(PeerHttpError, match="no answer"):
            await client.request(address, "GET", "/", {}, b"", head_timeout=0.2)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async with server(garbage) as (address, _):
        with pytest.raises(PeerHttpError, match="malformed"):
            await client.request(address, "GET", "/", {}, b"", head_timeout=2)

    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with server(hangs_up) as (address, _):
        with pytest.raises(PeerHttpError, match="before answering"):
            await client.request(address, "GET", "/", {}, b"", head_timeout=2)
    await client.aclose()
