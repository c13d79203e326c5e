"""The web listener's ASGI app in process: the page's files, the API behind them, the WebSocket key."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from omx.runtime.web import WS_PROTOCOL, DashboardApp

WEB = Path(__file__).resolve().parents[1] / "runtime" / "web"


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "authorization": request.headers.get("authorization")})


async def _ws(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_json({"authorization": ws.headers.get("authorization"),
                        "protocol": ws.headers.get("sec-websocket-protocol"), "subprotocols": ws.scope["subprotocols"]})
    await ws.close()


def _api() -> Starlette:
    """A stand-in API that echoes what reached it (the adapter is what is under test)."""
    return Starlette(routes=[Route("/{path:path}", _echo, methods=["GET", "POST"]), WebSocketRoute("/ws", _ws)])


@pytest.fixture
def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=DashboardApp(_api())), base_url="http://web")


async def test_root_is_the_page_with_a_same_origin_policy(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == (WEB / "index.html").read_bytes()
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    js = await client.get("/ui/main.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert (await client.head("/ui/style.css")).content == b""


@pytest.mark.parametrize("path", ["/ui/missing.js", "/ui/..%2Fdashboard.py", "/ui/dashboard.py", "/ui/"])
async def test_unknown_or_unshipped_files_are_404(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 404 and r.json() == {"error": "not found"}


async def test_writes_to_the_page_are_405(client: httpx.AsyncClient) -> None:
    r = await client.post("/ui/main.js")
    assert r.status_code == 405 and "error" in r.json()


async def test_other_paths_reach_the_api_unchanged(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/tags", headers={"Authorization": "Bearer k"})
    assert r.json() == {"path": "/api/tags", "authorization": "Bearer k"}


def _key_protocol(key: str) -> str:
    return "omx.bearer." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _ws_seen(subprotocols: list[str] | None, headers: dict[str, str] | None = None) -> tuple[Any, str | None]:
    with TestClient(DashboardApp(_api())) as tc, \
            tc.websocket_connect("/ws", subprotocols=subprotocols, headers=dict(headers or {})) as ws:
        return ws.receive_json(), ws.accepted_subprotocol


def test_websocket_key_subprotocol_becomes_the_bearer_header() -> None:
    seen, accepted = _ws_seen([WS_PROTOCOL, _key_protocol("k-_/+?~")])
    assert seen == {"authorization": "Bearer k-_/+?~", "protocol": None, "subprotocols": [WS_PROTOCOL]}
    assert accepted == WS_PROTOCOL


def test_websocket_key_replaces_a_sent_authorization_and_bad_keys_add_none() -> None:
    seen, _ = _ws_seen([WS_PROTOCOL, _key_protocol("k2")], {"Authorization": "Bearer other"})
    assert seen["authorization"] == "Bearer k2"
    seen, accepted = _ws_seen([WS_PROTOCOL, "omx.bearer.%%%"])
    assert seen["authorization"] is None and accepted == WS_PROTOCOL


def test_websocket_without_the_omx_protocol_is_untouched() -> None:
    seen, accepted = _ws_seen(None, {"Authorization": "Bearer plain"})
    assert seen["authorization"] == "Bearer plain" and accepted is None
