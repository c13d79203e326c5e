"""The ASGI app of the web listener: the dashboard's files, and the node's API on the same origin.

``GET /`` is the page and ``/ui/<file>`` its scripts and styles, read once from
this package (no build step, nothing fetched from elsewhere; the Content Security
Policy keeps every request of the page on this origin). Every other request goes
to the API app unchanged, so the page uses the same handlers, the same API-key
check and the same errors as any client. The one adaptation: a browser cannot set
``Authorization`` on a WebSocket, so the page offers its key as the subprotocol
``omx.bearer.<base64url key>`` beside ``omx``; here it becomes the Bearer header
the API checks, and the handshake answers with ``omx``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["WS_PROTOCOL", "DashboardApp"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

WS_PROTOCOL = "omx"
_BEARER_PREFIX = "omx.bearer."
_ASSETS = "/ui/"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")


def _load_files(root: Path) -> dict[str, tuple[bytes, str]]:
    files = {}
    for path in sorted(root.iterdir()):
        kind = _TYPES.get(path.suffix)
        if kind is not None and path.is_file():
            files[path.name] = (path.read_bytes(), kind)
    return files


class DashboardApp:
    """Serve the dashboard's files and pass everything else to ``api`` (which keeps its own lifespan)."""

    def __init__(self, api: Callable[[Scope, Receive, Send], Awaitable[None]], root: Path | None = None) -> None:
        self._api = api
        self._files = _load_files(root or Path(__file__).parent)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "http" and (scope["path"] == "/" or scope["path"].startswith(_ASSETS)):
            await self._static(scope, send)
        elif kind == "websocket":
            await _forward_ws(self._api, scope, receive, send)
        else:
            await self._api(scope, receive, send)

    async def _static(self, scope: Scope, send: Send) -> None:
        name = "index.html" if scope["path"] == "/" else scope["path"][len(_ASSETS):]
        found = self._files.get(name) if "/" not in name else None
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            status, body, ctype = 405, b'{"error": "method not allowed"}', "application/json"
        elif found is None:
            status, body, ctype = 404, b'{"error": "not found"}', "application/json"
        else:
            status, (body, ctype) = 200, found
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
                   (b"referrer-policy", b"no-referrer"), (b"content-security-policy", _CSP.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer this listener's lifespan: the API app's startup and shutdown run on the API listener."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _bearer_from_protocols(protocols: list[str]) -> str | None:
    for proto in protocols:
        if proto.startswith(_BEARER_PREFIX):
            encoded = proto[len(_BEARER_PREFIX):]
            try:
                key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            return key or None
    return None


async def _forward_ws(api: Callable[[Scope, Receive, Send], Awaitable[None]], scope: Scope,
                      receive: Receive, send: Send) -> None:
    """Move a key offered as a subprotocol into ``Authorization`` and answer the handshake with ``omx``."""
    protocols = [str(p) for p in scope.get("subprotocols") or []]
    if WS_PROTOCOL not in protocols:
        await api(scope, receive, send)
        return
    key = _bearer_from_protocols(protocols)
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"sec-websocket-protocol"]
    if key is not None:
        headers = [(k, v) for k, v in headers if k.lower() != b"authorization"]
        headers.append((b"authorization", f"Bearer {key}".encode()))
    inner = {**scope, "headers": headers, "subprotocols": [WS_PROTOCOL]}

    async def send_with_protocol(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "websocket.accept":
            message = {**message, "subprotocol": WS_PROTOCOL}
        await send(message)

    await api(inner, receive, send_with_protocol)
