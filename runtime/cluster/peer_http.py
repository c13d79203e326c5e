"""A lean HTTP/1.1 keep-alive client for forwarded calls: one request, its answer as it arrives.

Forwarding sits on the path of every routed request, and a general client
(httpx: cookies, auth and redirect layers, h11 events) spent more CPU per
relayed request than the answering node's whole server. This one speaks just
what peers answer: a request with a ``Content-Length`` body; a response with a
``Content-Length`` or a chunked body, whose pieces are handed over as they
arrive (a chunk of a relayed NDJSON or SSE stream is one line or event).
Connections are kept per address and reused once a body was read to its end;
a body dropped half-way closes its connection. A request on a reused
connection that the peer had closed meanwhile (its keep-alive timeout) is sent
again on a fresh one, as nothing of it was answered.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping

__all__ = ["PeerHttp", "PeerHttpError", "PeerHttpResponse"]

_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 1024


class PeerHttpError(ConnectionError):
    """The request failed on the wire (refused, reset, timed out, malformed answer)."""


class _Stale(PeerHttpError):
    """A reused connection was closed before any byte of the answer came back."""


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise PeerHttpError(f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise PeerHttpError("malformed response header")
            headers[name.strip().lower()] = value.strip()
    return int(code), headers


class _Conn:
    __slots__ = ("address", "reader", "writer")

    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class PeerHttpResponse:
    """A response whose body is still arriving; read :meth:`chunks` to the end or :meth:`aclose` it."""

    def __init__(self, client: PeerHttp, conn: _Conn, status: int, headers: dict[str, str],
                 read_timeout: float) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self._read_timeout = read_timeout
        self._length: int | None = None
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._keep = headers.get("connection", "").lower() != "close"
        if not self._chunked:
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise PeerHttpError("malformed Content-Length")
                self._length = int(length)
            elif status in (204, 304) or 100 <= status < 200:
                self._length = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive; raises :class:`PeerHttpError` when the transfer breaks."""
        conn = self._conn
        if conn is None:
            return
        reader = conn.reader
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(self._read_timeout):
                        line = await reader.readuntil(b"\r\n")
                        if len(line) > _MAX_CHUNK_LINE:
                            raise PeerHttpError("malformed chunk size")
                        size = int(line.split(b";", 1)[0], 16)
                        if size == 0:
                            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                                pass
                            break
                        data = await reader.readexactly(size + 2)
                    if not data.endswith(b"\r\n"):
                        raise PeerHttpError("malformed chunk")
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left:
                    async with asyncio.timeout(self._read_timeout):
                        data = await reader.read(min(left, 1 << 20))
                    if not data:
                        raise PeerHttpError("peer closed the connection mid-body")
                    left -= len(data)
                    yield data
            else:  # until the peer closes
                self._keep = False
                while True:
                    async with asyncio.timeout(self._read_timeout):
                        data = await reader.read(1 << 20)
                    if not data:
                        break
                    yield data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            self._drop()
            raise PeerHttpError(f"answer broken off: {exc or type(exc).__name__}") from exc
        self._conn = None
        if self._keep:
            self._client.release(conn)
        else:
            conn.close()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        """Close the connection unless the body was read to its end (then it went back to the pool)."""
        self._drop()


class PeerHttp:
    """Keep-alive HTTP/1.1 connections to peers (``host:port``), one request at a time on each."""

    transport = "h1"
    """The label of this client's bytes in ``omx_peer_bytes_total``."""

    def __init__(self, *, connect_timeout: float = 3.0, max_idle_per_address: int = 32) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_address
        self._idle: dict[str, list[_Conn]] = defaultdict(list)
        self._closed = False

    async def _connect(self, address: str) -> _Conn:
        host, _, port = address.rpartition(":")
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), limit=_MAX_HEAD)
        except (OSError, TimeoutError, ValueError) as exc:
            raise PeerHttpError(f"cannot connect to {address}: {exc or type(exc).__name__}") from exc
        return _Conn(address, reader, writer)

    def _take(self, address: str) -> _Conn | None:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def release(self, conn: _Conn) -> None:
        idle = self._idle[conn.address]
        if self._closed or len(idle) >= self.max_idle or not conn.usable():
            conn.close()
        else:
            idle.append(conn)

    async def request(self, address: str, method: str, target: str, headers: Mapping[str, str], body: bytes, *,
                      head_timeout: float, read_timeout: float | None = None) -> PeerHttpResponse:
        """Send a request and return once the response head arrived (the body is read from the response)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {address}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        conn = self._take(address)
        if conn is not None:
            try:
                return await self._exchange(conn, data, head_timeout, read_timeout, reused=True)
            except _Stale:
                pass  # the peer closed it while idle: nothing was answered, send on a new connection
        return await self._exchange(await self._connect(address), data, head_timeout, read_timeout, reused=False)

    async def _exchange(self, conn: _Conn, data: bytes, head_timeout: float, read_timeout: float | None,
                        *, reused: bool) -> PeerHttpResponse:
        try:
            conn.writer.write(data)
            async with asyncio.timeout(head_timeout):
                head = await conn.reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(head[:-4])
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if reused and not exc.partial:
                raise _Stale("connection closed by the peer") from exc
            raise PeerHttpError("peer closed the connection before answering") from exc
        except (OSError, asyncio.LimitOverrunError, TimeoutError) as exc:
            conn.close()
            if reused and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _Stale("connection reset by the peer") from exc
            raise PeerHttpError(f"no answer: {exc or type(exc).__name__}") from exc
        except PeerHttpError:
            conn.close()
            raise
        return PeerHttpResponse(self, conn, status, headers, head_timeout if read_timeout is None else read_timeout)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
