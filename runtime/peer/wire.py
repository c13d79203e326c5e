"""A lean HTTP/1.1 keep-alive client for peer GETs: response bodies land in their final buffer.

Chunk bodies are the node's bulk traffic. httpx (through httpcore and h11)
reads 64 KiB at a time and copies each piece several times, which held a
loopback transfer to about a quarter of what the socket gives. Here an
:class:`asyncio.BufferedProtocol` hands the kernel a view of the response's
own ``bytearray`` (sized from ``Content-Length``), so the bytes are copied
once, from the socket into place. Only what peers answer is supported:
``Content-Length`` responses to GET requests (a chunked or length-less
response is a protocol error); connections are reused per address.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["WireClient", "WireError", "WireResponse"]

_HEAD_LIMIT = 64 * 1024


class WireError(ConnectionError):
    """The request failed on the wire (refused, reset, timed out, malformed answer)."""


@dataclass(frozen=True)
class WireResponse:
    status: int
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytearray | memoryview
    """The caller's buffer (``into``) when it had the right size, else a new one."""


def _parse_head(data: bytes) -> tuple[int, dict[str, str]]:
    lines = data.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise WireError(f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise WireError("malformed response header")
            headers[name.strip().lower()] = value.strip()
    return int(code), headers


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._scratch = bytearray(_HEAD_LIMIT)
        self._head = bytearray()
        self._body: bytearray | memoryview | None = None
        self._into: bytearray | memoryview | None = None
        self._pos = 0
        self._status = 0
        self._headers: dict[str, str] = {}
        self._max_body = 0
        self._waiter: asyncio.Future[WireResponse] | None = None
        self.received_any = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self, request: bytes, max_body: int,
              into: bytearray | memoryview | None = None) -> asyncio.Future[WireResponse]:
        assert self.transport is not None and self._waiter is None
        self._head.clear()
        self._body, self._pos, self._max_body, self.received_any = None, 0, max_body, False
        self._into = into
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None and self._pos < len(self._body):
            return memoryview(self._body)[self._pos:]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self.received_any = True
        if self._waiter is None or self._waiter.done():
            self._fail(WireError("unexpected bytes from the peer"))
            return
        if self._body is not None:
            self._pos += nbytes
        else:
            self._head += memoryview(self._scratch)[:nbytes]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _HEAD_LIMIT:
                    self._fail(WireError("response head too large"))
                return
            try:
                self._begin_body(end)
            except WireError as exc:
                self._fail(exc)
                return
        if self._body is not None and self._pos >= len(self._body):
            if self._pos > len(self._body):
                self._fail(WireError("the peer sent more than its Content-Length"))
                return
            waiter, self._waiter = self._waiter, None
            waiter.set_result(WireResponse(self._status, self._headers, self._body))
            if self._headers.get("connection", "").lower() == "close":
                self.close()

    def _begin_body(self, end: int) -> None:
        self._status, self._headers = _parse_head(bytes(self._head[:end]))
        length_text = self._headers.get("content-length")
        if length_text is None or not length_text.isdigit():
            raise WireError("the peer's response has no Content-Length")
        length = int(length_text)
        if length > self._max_body:
            raise WireError(f"the peer's response is {length} bytes, more than the {self._max_body} expected")
        extra = self._head[end + 4:]
        if len(extra) > length:
            raise WireError("the peer sent more than its Content-Length")
        into, self._into = self._into, None
        # A reused buffer is warm: no page faults and no zeroing for every chunk received.
        self._body = into if into is not None and len(into) == length else bytearray(length)
        self._body[:len(extra)] = extra
        self._pos = len(extra)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._waiter = None
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(WireError(f"connection closed by the peer{f': {exc}' if exc else ''}"))
        self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        return not self.closed and self._waiter is None


class WireClient:
    """GET requests over pooled keep-alive connections, by ``host:port`` address."""

    transport = "h1"
    """The label of this client's bytes in ``omx_peer_bytes_total``."""

    def __init__(self, *, connect_timeout: float = 5.0, max_idle_per_address: int = 16) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_address
        self._idle: dict[str, list[_Connection]] = defaultdict(list)
        self._closed = False

    async def _connect(self, address: str) -> _Connection:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, host, int(port))
        except (OSError, TimeoutError) as exc:
            raise WireError(f"cannot connect to {address}: {exc or 'timed out'}") from exc
        return conn

    def _take(self, address: str) -> _Connection | None:
        pool = self._idle[address]
        while pool:
            conn = pool.pop()
            if conn.idle:
                return conn
        return None

    async def get(self, address: str, target: str, headers: dict[str, str], *, max_body: int,
                  timeout: float,  # noqa: ASYNC109 - a per-request deadline
                  into: bytearray | memoryview | None = None) -> WireResponse:
        """GET ``target`` from ``address``; raises :class:`WireError` on any failure on the wire.

        A body of exactly ``len(into)`` bytes is received into ``into``; once this returns
        or raises, nothing writes to it any more (a failed connection is closed first).
        """
        if self._closed:
            raise WireError("the peer client is closed")
        lines = [f"GET {target} HTTP/1.1", f"Host: {address}"] + [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            reused = self._take(address)
            conn = reused or await self._connect(address)
            try:
                async with asyncio.timeout(timeout):
                    response = await conn.start(request, max_body, into)
            except TimeoutError as exc:
                conn.close()
                raise WireError(f"GET {target} from {address} timed out after {timeout}s") from exc
            except WireError:
                conn.close()
                # A reused connection the peer closed while idle fails before any byte: retry once, fresh.
                if reused is not None and not conn.received_any and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if conn.idle and len(self._idle[address]) < self.max_idle:
                self._idle[address].append(conn)
            return response
        raise WireError(f"GET {target} from {address} failed")  # pragma: no cover - the loop always returns

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
