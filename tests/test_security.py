"""Authorization before reading, admin keys, trusted proxies, metrics_public and body limits.

Handler logic goes through the real adapter in process (httpx.ASGITransport);
the "no body is awaited" promises are checked once more against a real node
over a raw socket that sends headers only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from omx.errors import ConfigError
from omx.functions.builtin import builtin_registry
from omx.functions.call import Call
from omx.functions.dispatch import Dispatcher, peer_verifier
from omx.functions.forwarded import client_address, is_loopback, parse_networks
from omx.functions.registry import FunctionRegistry
from omx.mesh import ClusterSecret, Verifier, sign
from omx.runtime.app import MAX_JSON_BODY, PEER_MAX_BODY, build_app
from omx.runtime.config import load_settings
from tests.support.node import NodeProcess, start_node

KEY = "k1"
ADMIN = "a1"
PEER_KEY = ClusterSecret.generate().peer_auth_key()


class Echo(BaseModel):
    text: str
    n: int = 0


async def _echo(body: Echo, call: Call) -> dict[str, Any]:
    return {"text": body.text, "n": body.n, "peer": call.peer}


async def _whoami(_body: None, call: Call) -> dict[str, Any]:
    return {"client": call.client}


async def _stub(_body: Any, _call: Call) -> dict[str, bool]:
    return {"ran": True}


async def _upload(_body: None, call: Call) -> dict[str, int]:
    size = 0
    async for piece in call.stream_body():
        size += len(piece)
    return {"size": size}


def _registry(*, metrics_public: bool = True) -> FunctionRegistry:
    """Test handlers plus the built-in admin and metrics specs (same path and auth, stub functions)."""
    registry = FunctionRegistry()
    h = registry.handler
    h("/echo", request=Echo, name="echo")(_echo)
    h("/small", request=Echo, name="small", max_body=64)(_echo)
    h("/upload", body="raw", name="upload", max_body=64)(_upload)
    h("/whoami", methods=("GET",), auth="public", name="whoami")(_whoami)
    h("/peer/echo", request=Echo, auth="peer", name="peer_echo")(_echo)
    builtins = builtin_registry(metrics_public=metrics_public)
    for name in ("cluster_token", "cluster_join", "cluster_leave", "prometheus_metrics", "health", "version"):
        registry.add(dataclasses.replace(builtins.get(name), func=_stub))
    return registry


def _client(dispatcher: Dispatcher, *, peer: str = "127.0.0.1", metrics_public: bool = True) -> httpx.AsyncClient:
    app = build_app(_registry(metrics_public=metrics_public), None, dispatcher)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://node")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class _Body:
    """A request body that records whether the server ever asked for it."""

    def __init__(self, size: int, piece: int = 2**16) -> None:
        self.size, self.piece, self.pulled = size, piece, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        while sent < self.size:
            self.pulled += 1
            chunk = b" " * min(self.piece, self.size - sent)
            sent += len(chunk)
            yield chunk


# ------------------------------------------------------------------ authorize before reading


async def test_a_refused_caller_is_answered_without_a_body_byte_read() -> None:
    async with _client(Dispatcher(api_keys=[KEY])) as client:
        body = _Body(200_000_000)
        r = await client.post("/echo", content=body, headers={"Content-Length": "200000000"})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert body.pulled == 0
        assert r.headers["connection"] == "close"  # the unread body ends the connection: no client reuses it
        r = await client.post("/echo", content=b"")
        assert r.status_code == 401 and "connection" not in r.headers  # no body: the connection may go on
        body = _Body(10**6)
        r = await client.post("/api/cluster/join", content=body, headers=_bearer(KEY))
        assert r.status_code == 403 and body.pulled == 0


async def test_declared_length_over_the_limit_is_413_before_reading() -> None:
    async with _client(Dispatcher(api_keys=[KEY])) as client:
        body = _Body(MAX_JSON_BODY + 1)
        r = await client.post("/echo", content=body,
                              headers={**_bearer(KEY), "Content-Length": str(MAX_JSON_BODY + 1)})
        assert r.status_code == 413 and "too large" in r.json()["error"] and body.pulled == 0
        r = await client.post("/small", content=b'{"text": "' + b"x" * 100 + b'"}', headers=_bearer(KEY))
        assert r.status_code == 413 and body.pulled == 0
        r = await client.post("/echo", content=b"{}", headers={**_bearer(KEY), "Content-Length": "nope"})
        assert r.status_code == 400


async def test_a_streamed_body_without_length_is_cut_at_the_limit() -> None:
    async with _client(Dispatcher()) as client:
        body = _Body(10**6, piece=16)
        r = await client.post("/small", content=body)  # chunked: no Content-Length to check up front
        assert r.status_code == 413 and body.pulled < 10  # stopped just past 64 bytes
        r = await client.post("/upload", content=_Body(65, piece=8))
        assert r.status_code == 413
        r = await client.post("/upload", content=_Body(64, piece=8))
        assert r.status_code == 200 and r.json() == {"size": 64}


async def test_bodies_in_pieces_still_parse() -> None:
    async with _client(Dispatcher(api_keys=[KEY])) as client:
        raw = json.dumps({"text": "é" * 5000, "n": 7}).encode()

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), 7):  # splits multi-byte characters across pieces
                yield raw[i:i + 7]

        r = await client.post("/echo", content=pieces(), headers=_bearer(KEY))
        assert r.status_code == 200 and r.json() == {"text": "é" * 5000, "n": 7, "peer": None}
        r = await client.post("/echo", content=b"[1]", headers=_bearer(KEY))
        assert r.status_code == 400 and "JSON object" in r.json()["error"]


# ------------------------------------------------------------------ admin keys


async def test_cluster_admin_needs_an_admin_key_when_keys_are_set() -> None:
    async with _client(Dispatcher(api_keys=[KEY], admin_keys=[ADMIN]), peer="10.1.2.3") as client:
        for method, path in (("GET", "/api/cluster/token"), ("POST", "/api/cluster/leave"),
                             ("POST", "/api/cluster/join")):
            body = {"token": "omx1.x"} if path.endswith("join") else None
            assert (await client.request(method, path, json=body)).status_code == 401
            refused = await client.request(method, path, json=body, headers=_bearer(KEY))
            assert refused.status_code == 403 and "admin key" in refused.json()["error"], path
            allowed = await client.request(method, path, json=body, headers=_bearer(ADMIN))
            assert allowed.status_code == 200 and allowed.json() == {"ran": True}, path
        # an admin key is an API key as well
        assert (await client.post("/echo", json={"text": "hi"}, headers=_bearer(ADMIN))).status_code == 200


async def test_api_keys_without_admin_keys_leave_nobody_admin() -> None:
    async with _client(Dispatcher(api_keys=[KEY])) as client:  # even from loopback
        r = await client.get("/api/cluster/token", headers=_bearer(KEY))
        assert r.status_code == 403 and "security.admin_keys" in r.json()["error"]


async def test_without_keys_admin_is_loopback_only() -> None:
    async with _client(Dispatcher(), peer="127.0.0.1") as local:
        assert (await local.get("/api/cluster/token")).status_code == 200
    async with _client(Dispatcher(), peer="192.0.2.7") as remote:
        r = await remote.get("/api/cluster/token")
        assert r.status_code == 403 and "error" in r.json()


# ------------------------------------------------------------------ trusted proxies


async def test_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    spoofed = {"X-Forwarded-For": "127.0.0.1"}
    async with _client(Dispatcher(), peer="192.0.2.7") as direct:
        assert (await direct.get("/whoami", headers=spoofed)).json() == {"client": "192.0.2.7"}
        assert (await direct.get("/api/cluster/token", headers=spoofed)).status_code == 403
    # a proxy on this machine, not declared: every client looks local (what the README warns about)
    async with _client(Dispatcher(), peer="127.0.0.1") as undeclared:
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        assert (await undeclared.get("/whoami", headers=forwarded)).json() == {"client": "127.0.0.1"}
    async with _client(Dispatcher(trusted_proxies=["127.0.0.1"]), peer="127.0.0.1") as proxied:
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        assert (await proxied.get("/whoami", headers=forwarded)).json() == {"client": "203.0.113.9"}
        assert (await proxied.get("/api/cluster/token", headers=forwarded)).status_code == 403
        # the client wrote the left hop itself: the rightmost untrusted one is the client
        forged = {"X-Forwarded-For": "127.0.0.1, 203.0.113.9"}
        assert (await proxied.get("/api/cluster/token", headers=forged)).status_code == 403
        # a client on the proxy's own machine is local
        assert (await proxied.get("/api/cluster/token", headers={"X-Forwarded-For": "127.0.0.1"})).status_code == 200
    async with _client(Dispatcher(trusted_proxies=["10.0.0.0/8"]), peer="10.9.8.7") as lan_proxy:
        two = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9, 10.0.0.2")]
        assert (await lan_proxy.get("/whoami", headers=two)).json() == {"client": "203.0.113.9"}


def test_client_address_parses_hops() -> None:
    proxies = parse_networks(["127.0.0.1", "fd00::/8"])
    assert client_address("127.0.0.1", ["[2001:db8::1]:443"], proxies) == "2001:db8::1"
    assert client_address("127.0.0.1", ["198.51.100.1:5000, fd00::5"], proxies) == "198.51.100.1"
    assert client_address("::ffff:127.0.0.1", ["not-an-ip"], proxies) == "not-an-ip"
    assert client_address("127.0.0.1", [], proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", ["fd00::1, 127.0.0.1"], proxies) == "fd00::1"
    assert client_address("192.0.2.1", ["127.0.0.1"], proxies) == "192.0.2.1"
    assert not is_loopback("not-an-ip") and is_loopback("::1") and is_loopback("127.5.6.7")
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["not-a-net"])


def test_trusted_proxies_are_validated_in_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMX_HOME", str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text("security:\n  trusted_proxies: ['10.0.0.0/8', '::1']\n  admin_keys: [a1]\n")
    settings = load_settings(path)
    assert settings.security.trusted_proxies == ["10.0.0.0/8", "::1"] and settings.security.admin_keys == ["a1"]
    assert settings.security.metrics_public is True
    path.write_text("security:\n  trusted_proxies: [proxy.example]\n")
    with pytest.raises(ConfigError, match="security.trusted_proxies"):
        load_settings(path)


# ------------------------------------------------------------------ metrics_public


async def test_metrics_public_false_needs_a_key() -> None:
    async with _client(Dispatcher(api_keys=[KEY]), metrics_public=True) as client:
        assert (await client.get("/metrics")).status_code == 200
    async with _client(Dispatcher(api_keys=[KEY]), metrics_public=False) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=_bearer(KEY))).status_code == 200
        for path in ("/health", "/api/version"):
            assert (await client.get(path)).status_code == 200


def test_public_endpoints_are_the_documented_ones() -> None:
    public = {spec.path for spec in builtin_registry() if spec.auth == "public"}
    assert public == {"/", "/health", "/api/version", "/openapi.json", "/metrics", "/api/cluster/ca"}
    assert "/metrics" not in {spec.path for spec in builtin_registry(metrics_public=False) if spec.auth == "public"}


# ------------------------------------------------------------------ peer bodies


def _peer_client() -> httpx.AsyncClient:
    return _client(Dispatcher(api_keys=[KEY], peer_verifier=peer_verifier(Verifier(PEER_KEY))), peer="10.0.0.2")


async def test_peer_body_is_signed_over_its_digest() -> None:
    body = json.dumps({"text": "chunk index", "n": 3}).encode()
    async with _peer_client() as client:
        r = await client.post("/peer/echo", content=body, headers=sign(PEER_KEY, "omx-0000000b", "POST", "/peer/echo",
                                                                         body))
        assert r.status_code == 200 and r.json() == {"text": "chunk index", "n": 3, "peer": "omx-0000000b"}
        tampered = body.replace(b"3", b"4")
        headers = sign(PEER_KEY, "omx-0000000b", "POST", "/peer/echo", body)
        r = await client.post("/peer/echo", content=tampered, headers=headers)
        assert r.status_code == 401 and "does not match" in r.json()["error"]


async def test_peer_bodies_over_the_peer_limit_are_refused() -> None:
    async with _peer_client() as client:
        big = b'{"text": "' + b"x" * PEER_MAX_BODY + b'"}'
        signed = sign(PEER_KEY, "omx-0000000b", "POST", "/peer/echo", big)
        declared = _Body(len(big))
        r = await client.post("/peer/echo", content=declared, headers={**signed, "Content-Length": str(len(big))})
        assert r.status_code == 413 and declared.pulled == 0
        streamed = _Body(len(big))
        r = await client.post("/peer/echo", content=streamed, headers=signed)
        assert r.status_code == 413 and streamed.pulled * streamed.piece <= PEER_MAX_BODY + streamed.piece
        unsigned = _Body(10**6)
        r = await client.post("/peer/echo", content=unsigned, headers=_bearer(KEY))  # an API key is no signature
        assert r.status_code == 401 and "not signed" in r.json()["error"] and unsigned.pulled == 0


# ------------------------------------------------------------------ a real node, a raw socket


@pytest.fixture(scope="module")
def keyed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    env = {"OMX_SECURITY__API_KEYS": json.dumps([KEY]), "OMX_SECURITY__ADMIN_KEYS": json.dumps([ADMIN]),
           "OMX_SECURITY__METRICS_PUBLIC": "false"}
    node = start_node(tmp_path_factory.mktemp("keyed"), env=env)
    try:
        yield node
    finally:
        node.stop()


def _raw_exchange(url: str, head: str, deadline_s: float = 20.0) -> tuple[bytes, bool]:
    """Send only a request head, then read until the server hangs up or the deadline passes.

    Returns the bytes read and whether the server closed the connection (it
    never got the declared body, so a server waiting for it would not).
    """
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    with socket.create_connection((host, port), timeout=deadline_s) as sock:
        sock.sendall(head.encode("latin-1"))
        end = time.monotonic() + deadline_s
        data = b""
        closed = False
        while time.monotonic() < end:
            sock.settimeout(max(0.1, end - time.monotonic()))
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            if not piece:
                closed = True
                break
            data += piece
        return data, closed


def _head(path: str, length: int, extra: str = "") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n")


@pytest.mark.e2e
def test_huge_declared_body_without_a_key_gets_401_at_once(keyed_node: NodeProcess) -> None:
    cases = [
        (_head("/api/generate", 200_000_000), b"401", b"missing API key"),
        (_head("/api/generate", 200_000_000, "Authorization: Bearer nope\r\n"), b"401", b"invalid API key"),
        (_head("/api/cluster/join", 200_000_000, f"Authorization: Bearer {KEY}\r\n"), b"403", b"admin key"),
        (_head("/api/generate", MAX_JSON_BODY + 1, f"Authorization: Bearer {KEY}\r\n"), b"413", b"too large"),
        ("GET /api/peer/inventory HTTP/1.1\r\nHost: node\r\nContent-Length: 50000000\r\n\r\n", b"401",
         b"not signed"),
    ]
    for head, status, message in cases:
        answer, closed = _raw_exchange(keyed_node.url, head)
        assert answer.startswith(b"HTTP/1.1 " + status) and message in answer, answer[:300]
        assert closed, "the node kept the connection open, waiting for a body it will never use"
    # the node still serves (it did not sit on the unread bodies)
    assert httpx.get(keyed_node.url + "/api/version", timeout=20).status_code == 200


@pytest.mark.e2e
def test_real_node_admin_keys_and_private_metrics(keyed_node: NodeProcess) -> None:
    url = keyed_node.url
    refused = httpx.get(url + "/api/cluster/token", headers=_bearer(KEY), timeout=20)
    assert refused.status_code == 403 and "admin key" in refused.json()["error"]
    token = httpx.get(url + "/api/cluster/token", headers=_bearer(ADMIN), timeout=20)
    assert token.status_code == 200 and token.json()["token"].startswith("omx1.")
    assert httpx.get(url + "/metrics", timeout=20).status_code == 401
    assert httpx.get(url + "/metrics", headers=_bearer(KEY), timeout=20).status_code == 200
    omx = [sys.executable, "-c", "from omx.cli.main import main; main()", "--host", url, "cluster", "token"]
    env = {k: v for k, v in os.environ.items() if k != "OMX_API_KEY"}
    denied = subprocess.run(omx, capture_output=True, text=True, timeout=60, env={**env, "OMX_API_KEY": KEY})
    assert denied.returncode != 0 and "admin key" in denied.stderr and "Traceback" not in denied.stderr
    allowed = subprocess.run(omx, capture_output=True, text=True, timeout=60, env={**env, "OMX_API_KEY": ADMIN})
    assert allowed.returncode == 0 and allowed.stdout.strip().startswith("omx1."), allowed.stderr
