"""Cluster service parts without agents: secret resolution, event bus, auth modes, WebSocket adapter."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from omx.errors import ConfigError, Forbidden, Unauthorized
from omx.functions.call import Call
from omx.functions.dispatch import Dispatcher, RequestDone, peer_verifier
from omx.functions.registry import FunctionRegistry, HandlerSpec
from omx.mesh import ClusterSecret, JoinToken, Verifier, read_secret, sign, write_secret
from omx.runtime.app import build_app
from omx.runtime.cluster import resolve_secret
from omx.runtime.cluster.records import node_label, public_status
from omx.runtime.events import EventBus, NodeStateChanged, SubscriberLagged
from tests.support.node import wait_until

# ------------------------------------------------------------------ secrets


def test_secret_created_on_first_start_when_not_joining(tmp_path: Path) -> None:
    path = tmp_path / "cluster" / "secret"
    first = resolve_secret(None, path, False, {})
    assert first.source == "created" and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = resolve_secret(None, path, False, {})
    assert again.source == "file" and again.secret == first.secret


def test_join_without_any_secret_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with pytest.raises(ConfigError, match="--token"):
        resolve_secret(None, path, True, {})
    assert not path.exists()


def test_precedence_token_then_env_then_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    on_file, in_env, in_token = (ClusterSecret.generate() for _ in range(3))
    write_secret(path, on_file)
    env = {"OMX_CLUSTER_SECRET": in_env.value.hex()}
    assert resolve_secret(None, path, True, {}).secret == on_file
    assert resolve_secret(None, path, True, env).secret == in_env
    assert resolve_secret(None, path, True, {}).secret == in_env  # kept: a restart without the variable agrees
    token = JoinToken(seeds=("127.0.0.9:4001",), secret=in_token).encode()
    got = resolve_secret(token, path, True, env)
    assert got.secret == in_token and got.seeds == ("127.0.0.9:4001",) and got.source == "token"
    assert read_secret(path) == in_token  # a token's secret is kept for restarts


def test_bad_token_and_bad_env_secret_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="join token"):
        resolve_secret("omx1.garbage!!", tmp_path / "s", False, {})
    with pytest.raises(ConfigError, match="OMX_CLUSTER_SECRET"):
        resolve_secret(None, tmp_path / "s", False, {"OMX_CLUSTER_SECRET": "abc"})


# ------------------------------------------------------------------ pure helpers


def test_status_and_label_mapping() -> None:
    assert [public_status(s) for s in ("alive", "leaving", "left", "failed", "none", "suspect")] == [
        "alive", "left", "left", "failed", "failed", "suspect"]
    assert node_label("büro node #1") == "bro node 1"
    assert len(node_label("x" * 200)) == 63


# ------------------------------------------------------------------ event bus


async def test_bus_delivers_and_cuts_off_laggards() -> None:
    bus = EventBus()
    fast, slow = bus.subscribe(), bus.subscribe(maxsize=2)
    events = [NodeStateChanged("omx-00000001", {"p2p": i % 2 == 0}, float(i)) for i in range(3)]
    for event in events:
        bus.publish(event)
    assert [await asyncio.wait_for(fast.__anext__(), 5) for _ in range(3)] == events
    assert await slow.__anext__() == events[0]
    assert await slow.__anext__() == events[1]
    with pytest.raises(SubscriberLagged):
        await slow.__anext__()
    bus.close()
    with pytest.raises(StopAsyncIteration):
        await fast.__anext__()
    late = bus.subscribe()
    with pytest.raises(StopAsyncIteration):
        await late.__anext__()


# ------------------------------------------------------------------ dispatcher auth


async def _ok(_body: Any, _call: Call) -> dict[str, bool]:
    return {"ok": True}


def _call(spec: HandlerSpec, client: str | None, headers: dict[str, str] | None = None, path: str = "") -> Call:
    return Call(services=None, spec=spec, method="GET", headers=headers or {}, client=client,  # type: ignore[arg-type]
                path=path or spec.path)


def test_admin_auth_is_loopback_only_without_keys_and_key_with_keys() -> None:
    spec = HandlerSpec("admin", "/api/cluster/token", ("GET",), _ok, auth="admin")
    open_ = Dispatcher()
    open_.authorize(spec, _call(spec, "127.0.0.1"))
    open_.authorize(spec, _call(spec, "::1"))
    with pytest.raises(Forbidden):
        open_.authorize(spec, _call(spec, "10.1.2.3"))
    keyed = Dispatcher(api_keys=["k1"], admin_keys=["a1"])
    with pytest.raises(Unauthorized):
        keyed.authorize(spec, _call(spec, "127.0.0.1"))
    with pytest.raises(Forbidden, match="admin key"):
        keyed.authorize(spec, _call(spec, "127.0.0.1", {"authorization": "Bearer k1"}))
    keyed.authorize(spec, _call(spec, "10.1.2.3", {"authorization": "Bearer a1"}))


def test_peer_verifier_checks_the_raw_path_and_records_the_peer() -> None:
    key = ClusterSecret.generate().peer_auth_key()
    spec = HandlerSpec("inv", "/api/peer/inventory", ("GET",), _ok, auth="peer")
    dispatcher = Dispatcher(peer_verifier=peer_verifier(Verifier(key)))
    good = _call(spec, "10.0.0.1", sign(key, "omx-0000000a", "GET", "/api/peer/inventory?x=1"),
                 "/api/peer/inventory?x=1")
    dispatcher.authorize(spec, good)
    assert good.peer == "omx-0000000a"
    moved = _call(spec, "10.0.0.1", sign(key, "omx-0000000a", "GET", "/api/peer/inventory?x=1"),
                  "/api/peer/inventory?x=2")
    with pytest.raises(Unauthorized):
        dispatcher.authorize(spec, moved)


# ------------------------------------------------------------------ websocket adapter


def _ws_app(api_keys: tuple[str, ...] = ()) -> tuple[Any, list[RequestDone]]:
    registry = FunctionRegistry()

    async def counting(_body: None, call: Call) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            for i in range(int(call.query.get("n", "3"))):
                yield {"i": i}
        return gen()

    async def forever(_body: None, _call: Call) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield {"tick": True}
                await asyncio.sleep(0.01)
        return gen()

    registry.handler("/ws/count", methods=("GET",), response="websocket", name="count")(counting)
    registry.handler("/ws/forever", methods=("GET",), response="websocket", name="forever")(forever)
    dispatcher = Dispatcher(api_keys=api_keys)
    done: list[RequestDone] = []
    dispatcher.add_request_observer(done.append)
    return build_app(registry, None, dispatcher), done  # type: ignore[arg-type]


def test_websocket_handler_streams_json_messages_then_closes() -> None:
    app, done = _ws_app()
    with TestClient(app) as client, client.websocket_connect("/ws/count?n=3") as ws:
        assert [ws.receive_json() for _ in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000
    assert [d.handler for d in done] == ["count"]


def test_websocket_client_leaving_stops_the_stream() -> None:
    app, done = _ws_app()
    with TestClient(app) as client:
        with client.websocket_connect("/ws/forever") as ws:
            assert ws.receive_json() == {"tick": True}
            ws.close(1000)
            wait_until(lambda: done, timeout=20, what="the endless stream to end after the client left")
    assert [d.handler for d in done] == ["forever"]


def test_websocket_needs_the_api_key_when_keys_are_set() -> None:
    from starlette.testclient import WebSocketDenialResponse

    app, done = _ws_app(("k1",))
    with TestClient(app) as client:
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/ws/count"):
            pass
        assert denied.value.status_code == 401 and "API key" in denied.value.json()["error"]
        with client.websocket_connect("/ws/count?n=1", headers={"Authorization": "Bearer k1"}) as ws:
            assert ws.receive_json() == {"i": 0}
    assert [d.status for d in done] == [401, 101]
