"""The transfer listener, the lean peer client, the bandwidth limiter and the transfer tag."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from omx.errors import ConfigError
from omx.functions.call import Call, NodeInfo, Services
from omx.functions.dispatch import Dispatcher, peer_verifier
from omx.functions.registry import FileRange, FunctionRegistry
from omx.mesh import NodeTags, Verifier, sign
from omx.runtime.app import build_app
from omx.runtime.config import ReplicationConfig
from omx.runtime.peer import Bandwidth, TokenBucket, transfer_address
from omx.runtime.peer.server import PeerServer, parse_request_head
from omx.runtime.peer.wire import WireClient, WireError
from omx.types import NodeId
from tests.support.transfer import KEY


def _app(path: Path, claim: int) -> Any:
    """An app whose one peer handler sends ``claim`` bytes of ``path`` as a file range."""
    registry = FunctionRegistry()

    async def blob(_body: None, _call: Call) -> FileRange:
        return FileRange.open(path, 0, claim)

    async def info(_body: None, _call: Call) -> dict[str, int]:
        return {"answer": 42}

    registry.handler("/api/peer/blob", methods=("GET", "HEAD"), auth="public", response="file")(blob)
    registry.handler("/api/peer/info", methods=("GET",), auth="public")(info)
    services = Services(store=None, scheduler=None, node=NodeInfo(NodeId("omx-t"), "t"))  # type: ignore[arg-type]
    return build_app(registry, services, Dispatcher())


@contextlib.asynccontextmanager
async def _serve(app: Any, **options: Any) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    stop = asyncio.Event()
    task = asyncio.create_task(PeerServer(app, **{"idle_timeout": 5.0, **options}).serve(sock, stop.wait))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        await task
        sock.close()


async def _raw(address: str, request: bytes) -> bytes:
    host, _, port = address.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(1 << 20), 10)
    writer.close()
    return data


SIZE = 3 << 20


@pytest.fixture
def blob_file(tmp_path: Path) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    return path


async def test_file_ranges_are_sent_whole_over_one_kept_alive_connection(blob_file: Path) -> None:
    client = WireClient()
    data = await asyncio.to_thread(blob_file.read_bytes)
    async with _serve(_app(blob_file, SIZE)) as address:
        first = await client.get(address, "/api/peer/blob", {}, max_body=4 << 20, timeout=10)
        second = await client.get(address, "/api/peer/info", {}, max_body=1024, timeout=10)
        assert first.status == 200 and bytes(first.body) == data
        assert second.status == 200 and bytes(second.body) == b'{"answer":42}'
        assert len(client._idle[address]) == 1  # the same connection served both
        head = await _raw(address, b"HEAD /api/peer/blob HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert f"content-length: {SIZE}".encode() in head.lower()
    await client.aclose()


async def test_a_file_shorter_than_its_range_cuts_the_connection(blob_file: Path) -> None:
    client = WireClient()
    async with _serve(_app(blob_file, SIZE + 1000)) as address:
        with pytest.raises(WireError):
            await client.get(address, "/api/peer/blob", {}, max_body=4 << 20, timeout=10)
        ok = await client.get(address, "/api/peer/info", {}, max_body=1024, timeout=10)
        assert ok.status == 200  # the listener itself is fine
    await client.aclose()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"GET /api/peer/info HTTP/2.0\r\n\r\n", b"400"),
    (b"GET /api/peer/info HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
    (b"POST /api/peer/info HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
    (b"POST /api/peer/info HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    (b"POST /api/peer/info HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
    (b"GET /api/tags HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /api/peer/nothing HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /api/peer/info HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", b"431"),
])
async def test_malformed_requests_get_an_error_and_a_closed_connection(
        blob_file: Path, request_bytes: bytes, status: bytes) -> None:
    async with _serve(_app(blob_file, 10)) as address:
        answer = await _raw(address, request_bytes)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert b'"error"' in answer


def test_request_heads_are_parsed_strictly() -> None:
    head = parse_request_head(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n")
    assert (head.method, head.target, head.header(b"host"), head.keep_alive) == ("GET", "/a?b=1", b"x", False)
    assert parse_request_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_request_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    for bad in (b"GET /\r\n\r\n", b"get / HTTP/1.1\r\n\r\n", b"GET x HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\n: v\r\n\r\n", b"GET / HTTP/1.1\r\nna me: v\r\n\r\n"):
        with pytest.raises(ValueError):
            parse_request_head(bad)


async def test_the_client_reports_refusals_and_retries_a_connection_closed_while_idle(blob_file: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    client = WireClient(connect_timeout=2)
    with pytest.raises(WireError, match="cannot connect"):
        await client.get(f"127.0.0.1:{closed_port}", "/x", {}, max_body=10, timeout=5)
    app = _app(blob_file, 10)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    stop = asyncio.Event()
    server = asyncio.create_task(PeerServer(app, idle_timeout=0.2).serve(sock, stop.wait))
    try:
        await client.get(address, "/api/peer/info", {}, max_body=1024, timeout=5)
        idle = client._idle[address][0]
        deadline = asyncio.get_running_loop().time() + 20
        while not idle.closed:  # the server drops the idle connection
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        again = await client.get(address, "/api/peer/info", {}, max_body=1024, timeout=5)
        assert again.status == 200
        with pytest.raises(WireError, match="more than the"):
            await client.get(address, "/api/peer/blob", {}, max_body=5, timeout=5)
    finally:
        stop.set()
        await server
        sock.close()
        await client.aclose()


# ------------------------------------------------------------------ bandwidth


def test_the_token_bucket_admits_at_most_burst_plus_rate_times_elapsed() -> None:
    bucket = TokenBucket(1000.0, burst=500.0)
    waits = [bucket.reserve(250, now=0.0) for _ in range(6)]  # 1500 bytes at t=0
    assert waits[:2] == [0.0, 0.0]
    assert waits[2:] == [0.25, 0.5, 0.75, 1.0]  # each waits for the tokens it overdraws
    # Whoever waits its turn sends no faster than the rate: the last byte is due at (1500 - 500) / 1000 s.
    assert max(waits) == pytest.approx((1500 - 500) / 1000)
    assert bucket.reserve(0, now=10.0) == 0.0 and bucket.tokens == 500.0  # refills, capped at the burst
    assert bucket.admitted == 1500


def test_an_unlimited_bucket_never_waits_and_bad_settings_are_refused() -> None:
    bucket = TokenBucket(0)
    assert bucket.unlimited and all(bucket.reserve(1 << 30, now=0.0) == 0.0 for _ in range(5))
    for rate, burst in ((-1, None), (10, 0)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        TokenBucket(10).reserve(-1, now=0.0)


async def test_bandwidth_sleeps_for_what_the_bucket_reserves() -> None:
    slept: list[float] = []
    now = [100.0]

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limit = Bandwidth(1_000_000, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(5):
        await limit.acquire(1_000_000)
    # 5 MB at 1 MB/s with a 1 MB burst: 4 s of waiting in total, and nothing admitted early.
    assert sum(slept) == pytest.approx(4.0)
    assert limit.bucket.admitted == 5_000_000 <= 1_000_000 + 1_000_000 * (now[0] - 100.0)


def test_max_bandwidth_accepts_rates_and_sizes() -> None:
    assert ReplicationConfig().max_bandwidth == 0
    assert ReplicationConfig(max_bandwidth="10MB/s").max_bandwidth == 10_000_000
    assert ReplicationConfig(max_bandwidth="512KiB").max_bandwidth == 512 * 1024
    assert ReplicationConfig(max_bandwidth=2048).max_bandwidth == 2048
    for bad in ("fast", -1, "1XB/s"):
        with pytest.raises(ValueError):
            ReplicationConfig(max_bandwidth=bad)


# ------------------------------------------------------------------ addressing


def test_the_transfer_port_travels_in_the_tags_and_names_the_address() -> None:
    tags = NodeTags(api="10.0.0.5:8080", inventory="7", transfer_port=4002).to_tags()
    assert tags["xf"] == "4002" and NodeTags.from_tags(tags) == NodeTags("10.0.0.5:8080", None, "7", "", 4002)
    assert transfer_address(tags) == "10.0.0.5:4002"
    assert transfer_address(NodeTags(api="[::1]:8080", transfer_port=9).to_tags()) == "[::1]:9"
    assert transfer_address(NodeTags(api="10.0.0.5:8080").to_tags()) == "10.0.0.5:8080"  # API fallback
    assert transfer_address({"role": "not omx"}) is None
    with pytest.raises(ConfigError):
        NodeTags(api="10.0.0.5:8080", transfer_port=70000)


# ------------------------------------------------------------------ hop requests


class _Count(BaseModel):
    count: int = 3


def _hop_app(ended: asyncio.Event, gap_s: float) -> Any:
    """A hop handler that streams a line every ``gap_s`` (``ended`` is set when its stream closes), a plain one."""
    registry = FunctionRegistry()

    async def lines(body: _Count, _call: Call) -> AsyncIterator[dict[str, int]]:
        async def stream() -> AsyncIterator[dict[str, int]]:
            try:
                for i in range(body.count):
                    if i:
                        await asyncio.sleep(gap_s)
                    yield {"n": i}
            finally:
                ended.set()

        return stream()

    async def plain(_body: Any, _call: Call) -> dict[str, str]:
        return {"plain": "yes"}

    async def wait(_body: Any, call: Call) -> dict[str, str]:
        while not await call.is_disconnected():  # noqa: ASYNC110 - polled, as a non-streamed handler does
            await asyncio.sleep(0.02)
        ended.set()
        return {}

    registry.handler("/api/lines", methods=("POST",), request=_Count, response="ndjson", hop=True)(lines)
    registry.handler("/api/plain", methods=("POST",), request=_Count, auth="public", hop=False)(plain)
    registry.handler("/api/wait", methods=("POST",), request=_Count, hop=True)(wait)
    services = Services(store=None, scheduler=None, node=NodeInfo(NodeId("omx-t"), "t"))  # type: ignore[arg-type]
    return build_app(registry, services, Dispatcher(peer_verifier=peer_verifier(Verifier(KEY, window_s=300))))


def _hop_request(path: str, body: bytes, *, signed: bool = True) -> bytes:
    headers = {"X-Omx-Hop": "1", "Content-Type": "application/json", "Content-Length": str(len(body))}
    if signed:
        headers |= sign(KEY, "omx-a", "POST", path, body)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {path} HTTP/1.1\r\nHost: t\r\n{head}\r\n".encode() + body


async def test_signed_hop_requests_are_served_and_nothing_else_is() -> None:
    ended = asyncio.Event()
    async with _serve(_hop_app(ended, 0.0)) as address:
        ok = await _raw(address, _hop_request("/api/lines", b'{"count": 2}'))
        assert ok.startswith(b"HTTP/1.1 200") and ok.count(b'{"n":') == 2, ok[:300]
        unsigned = await _raw(address, _hop_request("/api/lines", b"{}", signed=False))
        assert unsigned.startswith(b"HTTP/1.1 401") and b'"error"' in unsigned
        # A handler that does not take hop requests is not served here, hop header or not.
        plain = await _raw(address, _hop_request("/api/plain", b"{}"))
        assert plain.startswith(b"HTTP/1.1 404") and b"peers only" in plain
        unmarked = _hop_request("/api/lines", b"{}").replace(b"X-Omx-Hop: 1\r\n", b"")
        assert (await _raw(address, unmarked)).startswith(b"HTTP/1.1 404")


async def test_a_client_that_leaves_a_stream_is_seen_at_once() -> None:
    ended = asyncio.Event()
    async with _serve(_hop_app(ended, 3600.0)) as address:  # no second line for an hour: no write can notice
        host, _, port = address.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_hop_request("/api/lines", b'{"count": 2}'))
        first = await asyncio.wait_for(reader.readuntil(b'{"n":0}'), 10)
        assert first.startswith(b"HTTP/1.1 200") and not ended.is_set()
        writer.close()
        await asyncio.wait_for(ended.wait(), 10)  # the stream was closed by the disconnect, not by an error


async def test_a_handler_polling_for_its_client_sees_it_leave() -> None:
    ended = asyncio.Event()
    async with _serve(_hop_app(ended, 0.0)) as address:
        host, _, port = address.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_hop_request("/api/wait", b"{}"))
        await writer.drain()
        await asyncio.sleep(0.2)  # let the handler poll a few times while the client is still there
        assert not ended.is_set()
        writer.close()
        await asyncio.wait_for(ended.wait(), 10)


async def test_a_request_pipelined_behind_a_stream_closes_the_connection_after_it() -> None:
    ended = asyncio.Event()
    async with _serve(_hop_app(ended, 0.05)) as address:
        host, _, port = address.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_hop_request("/api/lines", b'{"count": 3}') * 2)
        answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes the connection
        writer.close()
        assert answer.count(b"HTTP/1.1 200") == 1 and answer.count(b'{"n":') == 3, answer[:400]
        assert answer.endswith(b"0\r\n\r\n")  # the first answer whole, then the connection closed


async def test_connections_past_the_cap_are_refused_and_the_others_served(blob_file: Path) -> None:
    async with _serve(_app(blob_file, 10), max_connections=2) as address:
        host, _, port = address.partition(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(2)]  # hold both places
        refused = await _raw(address, b"GET /api/peer/info HTTP/1.1\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503") and b"too many peer connections" in refused
        reader, writer = idle[0]
        writer.write(b"GET /api/peer/info HTTP/1.1\r\n\r\n")  # a held connection is still served
        assert (await asyncio.wait_for(reader.readuntil(b"42}"), 10)).startswith(b"HTTP/1.1 200")
        for _, w in idle:
            w.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not (await _raw(address, b"GET /api/peer/info HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200"):
            assert asyncio.get_running_loop().time() < deadline, "a place never freed up"
            await asyncio.sleep(0.05)
