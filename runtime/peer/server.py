"""The transfer listener: a small HTTP/1.1 ASGI server for the peer endpoints, with ``sendfile``.

Hypercorn copies every response body through Python (and h11) several times.
Chunk transfers are the node's bulk traffic, so the peer endpoints are also
served on a second listener (``p2p.transfer_port``, advertised to peers in the
``xf`` Serf tag) by this server, which offers the ASGI *zero-copy send*
extension (``http.response.zerocopysend``): the adapter hands it a file and a
range, and the kernel sends the bytes (``loop.sendfile`` -> ``os.sendfile``).
It serves the same app as the API port, so handlers, auth and error mapping
are the registry's; only paths under ``/api/peer/`` and hop requests (calls a
peer forwarded, marked ``X-Omx-Hop``: the router sends them here because this
server adds less to each one than Hypercorn does) are answered here. The scope
carries the ``omx.peer_listener`` extension, so the app refuses any other
handler on this port (a hop request, like a peer one, must carry a valid peer
signature). A streamed answer learns of a client that left through
``http.disconnect`` at once, as under Hypercorn.

Supported: HTTP/1.1 (and 1.0) keep-alive, ``Content-Length`` request bodies up
to ``max_body`` bytes, fixed-length and chunked responses. Not supported (400
or 501, then the connection closes): chunked request bodies, ``Expect``,
upgrades, pipelining (a request that arrives while the previous one is being
answered closes the connection after that answer). The lifespan protocol is left
to the main server. At most ``max_connections`` (1024) are open at once; one
past that gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

__all__ = ["HOP_HEADER", "PEER_LISTENER", "PEER_PREFIX", "PeerServer", "RequestHead", "parse_request_head"]

log = logging.getLogger("omx.runtime.peer")

PEER_PREFIX = "/api/peer/"
HOP_HEADER = b"x-omx-hop"
PEER_LISTENER = "omx.peer_listener"
"""The scope extension that marks a request as having come in on this listener."""
_ZEROCOPY = "http.response.zerocopysend"
_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            416: "Range Not Satisfiable", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and header block."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    """Lower-cased names, raw values, in order."""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        conn = (self.header(b"connection") or b"").lower()
        if self.version == "HTTP/1.0":
            return b"keep-alive" in conn
        return b"close" not in conn


def parse_request_head(data: bytes) -> RequestHead:
    """Parse ``data`` (the bytes up to and including the blank line); raises ValueError when malformed."""
    lines = data.split(b"\r\n")
    try:
        method, target, version = lines[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError("malformed request line") from exc
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or not method.isupper():
        raise ValueError("unsupported method or HTTP version")
    if not target.startswith("/"):
        raise ValueError("request target must be an absolute path")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or any(c <= 32 or c >= 127 for c in name):
            raise ValueError("malformed header line")
        headers.append((name.lower(), value.strip()))
    return RequestHead(method, target, version, tuple(headers))


class _ResponseWriter:
    """The ASGI ``send`` of one request: frames the response on the connection."""

    def __init__(self, writer: asyncio.StreamWriter, head_only: bool) -> None:
        self.writer = writer
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.head_sent = False
        self.complete = False
        self.broken = False

    def _head(self, length_known: bool) -> bytes:
        names = {k.lower() for k, _ in self.headers}
        if not length_known and b"content-length" not in names and not self.head_only:
            self.chunked = True
            self.headers.append((b"transfer-encoding", b"chunked"))
        reason = _REASONS.get(self.status, "Status")
        lines = [f"HTTP/1.1 {self.status} {reason}".encode()]
        lines += [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            return
        if self.complete:
            return
        more = bool(message.get("more_body", False))
        if kind == "http.response.body":
            body = bytes(message.get("body", b""))
            out = b"" if self.head_sent else self._head(length_known=not more)
            self.head_sent = True
            if self.head_only:
                body = b""
            if self.chunked:
                out += (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
            else:
                out += body
            self.writer.write(out)
            await self.writer.drain()
        elif kind == _ZEROCOPY:
            await self._sendfile(message)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        self.complete = not more

    async def _sendfile(self, message: dict[str, Any]) -> None:
        if not self.head_sent:
            self.writer.write(self._head(length_known=True))
            self.head_sent = True
        if self.chunked or self.head_only:
            raise RuntimeError("zero-copy send needs a Content-Length response")
        file, offset, count = message["file"], int(message.get("offset", 0)), message.get("count")
        loop = asyncio.get_running_loop()
        sent = await loop.sendfile(self.writer.transport, file, offset, count)
        if count is not None and sent != count:
            self.broken = True  # the file was shorter than announced: the client must see a cut connection
            raise OSError(f"sent {sent} of {count} bytes: the file shrank")


class PeerServer:
    """Serves the peer routes of an ASGI app on its own socket (see the module docstring)."""

    def __init__(self, app: Any, *, prefix: str = PEER_PREFIX, max_body: int = 1 << 20,
                 idle_timeout: float = 65.0, max_connections: int = 1024) -> None:
        self.app = app
        self.prefix = prefix
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        """Connections past it get a 503 and are closed (the node's file descriptors stay for its API)."""
        self._connections: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket, shutdown: Callable[[], Awaitable[Any]]) -> None:
        """Accept connections on (a duplicate of) ``sock`` until ``shutdown`` returns."""
        server = await asyncio.start_server(self._connection, sock=sock.dup(), limit=64 * 1024)
        try:
            await shutdown()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 3.0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._error(writer, 503, "too many peer connections; retry later"), 1.0)
            writer.close()
            return
        self._connections.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # the listener is shutting down; ending quietly keeps asyncio from logging the cancellation
        except Exception:  # noqa: BLE001 - one broken connection must not take the listener down
            log.exception("transfer connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _error(self, writer: asyncio.StreamWriter, status: int, message: str) -> bool:
        body = orjson.dumps({"error": message})
        reason = _REASONS.get(status, "Error")
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        return False

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        except asyncio.LimitOverrunError:
            return await self._error(writer, 431, "request head too large")
        except asyncio.IncompleteReadError:
            return False
        try:
            head = parse_request_head(data)
        except ValueError as exc:
            return await self._error(writer, 400, str(exc))
        if head.header(b"transfer-encoding") is not None or head.header(b"expect") is not None:
            return await self._error(writer, 501, "chunked request bodies and Expect are not supported here")
        length_text = head.header(b"content-length") or b"0"
        if not length_text.isdigit():
            return await self._error(writer, 400, "invalid Content-Length header")
        length = int(length_text)
        if length > self.max_body:
            return await self._error(writer, 413, f"request body too large (the limit is {self.max_body} bytes)")
        body = await reader.readexactly(length) if length else b""
        path, _, query = head.target.partition("?")
        if not path.startswith(self.prefix) and head.header(HOP_HEADER) is None:
            return await self._error(writer, 404, f"404 page not found: {path} (this port serves peers only)")
        return await self._run_app(head, path, query, body, reader, writer)

    async def _run_app(self, head: RequestHead, path: str, query: str, body: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        done = asyncio.get_running_loop().create_future()
        delivered = False
        watch: asyncio.Future[bytes] | None = None

        async def receive() -> dict[str, Any]:
            nonlocal delivered, watch
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            if watch is None:  # one read outlives a cancelled receive(): Starlette polls with cancelled calls
                watch = asyncio.ensure_future(reader.read(1))
            if not (watch.done() or done.done()):  # a finished watch answers without waiting (a polled call)
                await asyncio.wait((watch, done), return_when=asyncio.FIRST_COMPLETED)
            if not done.done() and not watch.cancelled() and watch.exception() is None and watch.result():
                await asyncio.shield(done)  # a pipelined request, not a departure: closed after this answer
            return {"type": "http.disconnect"}

        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": head.version[5:],
            "method": head.method, "scheme": "http", "path": unquote(path), "raw_path": path.encode(),
            "query_string": query.encode(), "root_path": "", "headers": list(head.headers),
            "client": tuple(peer[:2]) if peer else None, "server": tuple(local[:2]) if local else None,
            "extensions": {_ZEROCOPY: {}, PEER_LISTENER: {}},
        }
        send = _ResponseWriter(writer, head_only=head.method == "HEAD")
        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - answered as a 500 when nothing was sent yet
            if send.head_sent:
                return False
            log.exception("peer request %s %s failed", head.method, path)
            return await self._error(writer, 500, "internal error")
        finally:
            done.set_result(None)
            pipelined = _settle(watch)
        if not send.complete:
            if send.head_sent:
                return False
            return await self._error(writer, 500, "internal error: the handler sent no response")
        return head.keep_alive and not send.broken and not pipelined


def _settle(watch: asyncio.Future[bytes] | None) -> bool:
    """Stop a request's disconnect watch; True when it read a byte of another request (the connection is done)."""
    if watch is None:
        return False
    if not watch.done():
        watch.cancel()  # nothing was read: the next request's bytes stay in the reader
        return False
    return watch.cancelled() or watch.exception() is not None or bool(watch.result())
