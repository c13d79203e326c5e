"""HTTP/3 end to end: real QUIC on real sockets against real nodes, verified against the cluster CA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from omx.mesh import ClusterSecret
from omx.runtime.http3 import Http3Transport
from omx.runtime.tls import cluster_ca, ensure_tls
from tests.support.h3_app import served_over_h3
from tests.support.node import NodeProcess, start_node

pytestmark = pytest.mark.timeout(180)


def h3_client(node: NodeProcess, ca: Path | None = None, **kw: object) -> httpx.Client:
    port = node.info["h3_port"]
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", timeout=60.0,
                        transport=Http3Transport(ca or node.home / "tls" / "ca.crt"), **kw)  # type: ignore[arg-type]


def test_version_and_tags_over_http3(node: NodeProcess) -> None:
    with h3_client(node) as client:
        r = client.get("/api/version")
        assert r.status_code == 200
        assert r.json()["version"]
        # Hypercorn names the protocol that carried the answer.
        assert r.headers["server"] == "hypercorn-h3"
        tags = client.get("/api/tags").json()
        assert "tiny:latest" in [m["name"] for m in tags["models"]]


def test_generate_streams_over_http3(node: NodeProcess) -> None:
    body = {"model": "tiny", "prompt": "hello", "stream": True, "options": {"num_predict": 8}}
    with h3_client(node) as client, client.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["server"] == "hypercorn-h3"
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert len(lines) >= 2
    assert all(not line["done"] for line in lines[:-1])
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] >= 1


def test_blob_upload_over_http3(node: NodeProcess) -> None:
    data = os.urandom(300_000)
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with h3_client(node) as client:
        assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
        assert client.head(f"/api/blobs/{digest}").status_code == 200
        bad = client.post(f"/api/blobs/sha256:{'0' * 64}", content=b"not it")
        assert bad.status_code == 400 and "error" in bad.json()


def test_client_with_another_ca_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.crt"
    ensure_tls(tmp_path, ClusterSecret.generate(), "omx-other", ["127.0.0.1"])
    other.write_bytes((tmp_path / "tls" / "ca.crt").read_bytes())
    with h3_client(node, ca=other) as client, pytest.raises(httpx.ConnectError):
        client.get("/api/version")
    with h3_client(node) as client:  # the node still serves everyone else
        assert client.get("/api/version").status_code == 200


def test_http1_answers_carry_alt_svc(node: NodeProcess) -> None:
    r = httpx.get(node.url + "/api/version")
    assert r.headers["alt-svc"] == f'h3=":{node.info["h3_port"]}"; ma=86400'
    assert r.headers["server"] == "hypercorn-h11"


def test_ca_endpoint_is_public_and_matches_the_file(node: NodeProcess) -> None:
    r = httpx.get(node.url + "/api/cluster/ca")
    assert r.status_code == 200
    assert r.text.encode() == (node.home / "tls" / "ca.crt").read_bytes()
    assert x509.load_pem_x509_certificate(r.content).extensions.get_extension_for_class(
        x509.BasicConstraints).value.ca is True


def test_leaf_certificate_is_a_server_leaf_chained_to_the_ca(node: NodeProcess) -> None:
    tls = node.home / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    chain = x509.load_pem_x509_certificates((tls / "node.crt").read_bytes())
    leaf = chain[0]
    assert chain[1] == ca
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1"} <= ips
    assert {"localhost", socket.gethostname().lower()} <= set(san.get_values_for_type(x509.DNSName))
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert (tls / "node.key").stat().st_mode & 0o777 == 0o600


def test_same_secret_same_ca_and_a_new_secret_reissues(tmp_path: Path) -> None:
    secret = ClusterSecret.generate()
    a = ensure_tls(tmp_path / "a", secret, "omx-a", ["127.0.0.2"])
    b = ensure_tls(tmp_path / "b", ClusterSecret(secret.value), "omx-b", ["127.0.0.3"])
    assert a.ca_cert.read_bytes() == b.ca_cert.read_bytes()
    assert a.cert.read_bytes() != b.cert.read_bytes()
    before = a.cert.read_bytes()
    assert ensure_tls(tmp_path / "a", secret, "omx-a", ["127.0.0.2"]).cert.read_bytes() == before
    # A name the leaf lacks gets a new leaf from the same CA.
    ensure_tls(tmp_path / "a", secret, "omx-a", ["127.0.0.9"])
    leaf = x509.load_pem_x509_certificates(a.cert.read_bytes())[0]
    assert "127.0.0.9" in {str(ip) for ip in leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)}
    # Another cluster's secret: another CA, and the leaf is reissued under it.
    other = ClusterSecret.generate()
    ensure_tls(tmp_path / "a", other, "omx-a", ["127.0.0.2"])
    new_ca = x509.load_pem_x509_certificate(a.ca_cert.read_bytes())
    assert new_ca == cluster_ca(other)[1] != cluster_ca(secret)[1]
    x509.load_pem_x509_certificates(a.cert.read_bytes())[0].verify_directly_issued_by(new_ca)


def test_two_nodes_with_one_secret_serve_under_one_ca(tmp_path: Path) -> None:
    secret = ClusterSecret.generate().to_text()
    env = {"OMX_CLUSTER_SECRET": secret, "OMX_WEB__ENABLED": "false"}
    first = start_node(tmp_path / "a", env=env)
    try:
        second = start_node(tmp_path / "b", env=env)
        try:
            assert (first.home / "tls" / "ca.crt").read_bytes() == (second.home / "tls" / "ca.crt").read_bytes()
            # One CA file trusts both nodes.
            with h3_client(second, ca=first.home / "tls" / "ca.crt") as client:
                assert client.get("/api/version").status_code == 200
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_node_joining_another_cluster_serves_its_ca_without_a_restart(tmp_path: Path) -> None:
    env = {"OMX_WEB__ENABLED": "false"}
    member = start_node(tmp_path / "member", host="127.0.0.1", env=env)
    try:
        joiner = start_node(tmp_path / "joiner", host="127.0.0.1", env=env)
        try:
            cluster_ca = member.home / "tls" / "ca.crt"
            with h3_client(joiner, ca=cluster_ca) as client, pytest.raises(httpx.ConnectError):
                client.get("/api/version")  # another cluster's CA: refused
            token = httpx.get(member.url + "/api/cluster/token", timeout=30).json()["token"]
            joined = httpx.post(joiner.url + "/api/cluster/join", json={"token": token}, timeout=60)
            assert joined.status_code == 200, joined.text
            assert (joiner.home / "tls" / "ca.crt").read_bytes() == cluster_ca.read_bytes()
            with h3_client(joiner, ca=cluster_ca) as client:  # the same process, now under the cluster's CA
                assert client.get("/api/version").status_code == 200
            assert joiner.proc.poll() is None
        finally:
            joiner.stop()
    finally:
        member.stop()


def test_http3_off_means_no_udp_listener(tmp_path: Path) -> None:
    node = start_node(tmp_path / "n", env={"OMX_API__HTTP3": "false", "OMX_WEB__ENABLED": "false"})
    try:
        assert node.info["h3_port"] is None
        assert "alt-svc" not in httpx.get(node.url + "/api/version").headers
        # Nothing answers QUIC on the API's port number.
        with h3_client_at(node, node.info["api_port"]) as client, pytest.raises(
                (httpx.ConnectError, httpx.ConnectTimeout)):
            client.get("/api/version", timeout=httpx.Timeout(5.0, connect=3.0))
        # The CA is still there to hand out.
        assert httpx.get(node.url + "/api/cluster/ca").status_code == 200
    finally:
        node.stop()


def h3_client_at(node: NodeProcess, port: int) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{port}",
                        transport=Http3Transport(node.home / "tls" / "ca.crt"))


def test_h3_port_moves_the_listener(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = start_node(tmp_path / "n", env={"OMX_API__H3_PORT": str(port), "OMX_WEB__ENABLED": "false"})
    try:
        assert node.info["h3_port"] == port != node.info["api_port"]
        assert httpx.get(node.url + "/").headers["alt-svc"] == f'h3=":{port}"; ma=86400'
        with h3_client(node) as client:
            assert client.get("/api/version").status_code == 200
    finally:
        node.stop()


def _omx(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMX_HOME": str(node.home)}
    env.pop("OMX_HOST", None)
    return subprocess.run([sys.executable, "-c", "from omx.cli.main import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_over_http3(node: NodeProcess) -> None:
    listed = _omx(node, "--http3", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "tiny:latest" in listed.stdout
    ran = _omx(node, "--http3", "run", "tiny", "hello")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip()
    ca = _omx(node, "cluster", "ca")
    assert ca.returncode == 0 and ca.stdout.encode() == (node.home / "tls" / "ca.crt").read_bytes()
    # Cluster administration too (loopback, no keys: allowed), and the version check.
    token = _omx(node, "--http3", "cluster", "token")
    assert token.returncode == 0 and token.stdout.startswith("omx1."), token.stderr
    version = _omx(node, "--http3", "version", "--json")
    assert json.loads(version.stdout)["node"]["url"].startswith("https://")
    assert json.loads(version.stdout)["node"]["version"]


def test_cli_http3_needs_a_ca(node: NodeProcess, tmp_path: Path) -> None:
    missing = _omx(node, "--http3", "--ca", str(tmp_path / "nope.crt"), "list")
    assert missing.returncode == 2
    assert "no cluster CA certificate" in missing.stderr and "Traceback" not in missing.stderr
    other = tmp_path / "other"
    ensure_tls(other, ClusterSecret.generate(), "omx-other", ["127.0.0.1"])
    wrong = _omx(node, "--http3", "--ca", str(other / "tls" / "ca.crt"), "list")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "no HTTP/3 answer" in wrong.stderr and "this cluster's CA" in wrong.stderr


def test_garbage_datagrams_leave_the_node_serving(node: NodeProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for i in range(200):
            # Random bytes, and random bytes behind a QUIC long-header Initial's first byte.
            udp.sendto((b"\xc0\x00\x00\x00\x01" if i % 2 else b"") + os.urandom(1200), ("127.0.0.1",
                                                                                     node.info["h3_port"]))
    with h3_client(node) as client:
        assert client.get("/api/version").status_code == 200


def test_datagram_size_is_large_only_on_loopback() -> None:
    from omx.runtime.http3 import LARGE_LOOPBACK_DATAGRAM, SAFE_DATAGRAM, datagram_size

    assert datagram_size("127.0.0.1") == datagram_size("::1") == datagram_size("localhost") == LARGE_LOOPBACK_DATAGRAM
    assert datagram_size("10.0.0.5") == datagram_size("node.example") == SAFE_DATAGRAM == 1200


def test_a_taken_h3_port_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        env = {**os.environ, "OMX_HOME": str(tmp_path), "OMX_API__H3_PORT": str(port), "OMX_P2P__PORT": "0",
               "OMX_WEB__ENABLED": "false"}
        done = subprocess.run([sys.executable, "-c", "from omx.cli.main import main; main()", "start",
                               "--api-port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"HTTP/3 UDP port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "Traceback" not in done.stderr


async def _qh3_get(port: int, cafile: Path, path: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """GET ``path`` with qh3 (another QUIC and TLS stack: rustls verifies the chain), not omx's client."""
    import asyncio

    from qh3.asyncio.client import connect
    from qh3.asyncio.protocol import QuicConnectionProtocol
    from qh3.h3.connection import H3_ALPN, H3Connection
    from qh3.h3.events import DataReceived, HeadersReceived
    from qh3.quic.configuration import QuicConfiguration

    class Client(QuicConnectionProtocol):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.h3 = H3Connection(self._quic)
            self.events: asyncio.Queue[object] = asyncio.Queue()

        def quic_event_received(self, event: object) -> None:
            for h3_event in self.h3.handle_event(event):  # type: ignore[arg-type]
                self.events.put_nowait(h3_event)

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="127.0.0.1")
    config.load_verify_locations(cafile=str(cafile))
    async with connect("127.0.0.1", port, configuration=config, create_protocol=Client) as client:
        assert isinstance(client, Client)
        stream = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream, [(b":method", b"GET"), (b":scheme", b"https"),
                                        (b":authority", f"127.0.0.1:{port}".encode()), (b":path", path.encode())],
                               end_stream=True)
        client.transmit()
        headers: list[tuple[bytes, bytes]] = []
        body = b""
        while True:
            event = await asyncio.wait_for(client.events.get(), 30)
            if isinstance(event, HeadersReceived):
                headers = list(event.headers)
            elif isinstance(event, DataReceived):
                body += event.data
            if getattr(event, "stream_ended", False):
                return headers, body


async def test_another_quic_stack_trusts_the_node_under_the_ca_only(node: NodeProcess, tmp_path: Path) -> None:
    headers, body = await _qh3_get(node.info["h3_port"], node.home / "tls" / "ca.crt", "/api/version")
    assert (b":status", b"200") in headers and (b"server", b"hypercorn-h3") in headers
    assert json.loads(body)["version"]
    ensure_tls(tmp_path, ClusterSecret.generate(), "omx-other", ["127.0.0.1"])
    with pytest.raises(ConnectionError):
        await _qh3_get(node.info["h3_port"], tmp_path / "tls" / "ca.crt", "/api/version")


def test_leaf_names_cover_names_addresses_and_wildcards() -> None:
    from omx.runtime.tls import leaf_names

    dns, ips = leaf_names(["Node-A.example", "[::ffff:10.1.2.3]", "10.0.0.7", "0.0.0.0"])
    assert "node-a.example" in dns and "localhost" in dns
    assert {"10.0.0.7", "::ffff:a01:203", "127.0.0.1", "::1"} <= set(ips)
    # A wildcard bind names every interface address; without one, only the addresses given (and loopback).
    import psutil

    iface = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    assert iface <= set(ips)
    assert set(leaf_names(["10.0.0.7"])[1]) == {"10.0.0.7", "127.0.0.1", "::1"}


def test_hypercorn_serves_quic_tuned_and_chooses_the_datagram_size_by_client() -> None:
    import hypercorn.asyncio.run as hypercorn_run

    from omx.runtime import quic_server

    quic_server.install()
    quic_server.install()  # idempotent
    assert hypercorn_run.UDPServer is quic_server.TunedUDPServer
    assert all(quic_server._loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"))
    assert not any(quic_server._loopback(h) for h in ("10.0.0.1", "::ffff:10.0.0.1", "fe80::1%eth0", "name"))


async def test_connections_past_the_bound_are_dropped_and_the_others_served(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from omx.runtime import quic_server
    from omx.runtime.peer.h3 import H3PeerClient
    from omx.runtime.peer.wire import WireError

    async def app(scope: dict[str, object], receive: object, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    tls = ensure_tls(tmp_path, ClusterSecret.generate(), "omx-bound", ["127.0.0.1"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind, config.quic_bind = [], [f"127.0.0.1:{port}"]
    config.certfile, config.keyfile = str(tls.cert), str(tls.key)
    config.accesslog = config.errorlog = None
    monkeypatch.setattr(quic_server.TunedQuicProtocol, "max_connections", 2)
    quic_server.install()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait, mode="asgi"))  # type: ignore[arg-type]
    clients = [H3PeerClient(tls.ca_cert, connect_timeout=3) for _ in range(3)]
    try:
        address = f"127.0.0.1:{port}"
        for client in clients[:2]:
            for _ in range(100):  # the server may still be binding
                try:
                    assert bytes((await client.get(address, "/", {}, max_body=10, timeout=5)).body) == b"ok"
                    break
                except WireError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the server never answered")
        with pytest.raises(WireError, match="no HTTP/3 answer"):
            await clients[2].get(address, "/", {}, max_body=10, timeout=5)
        assert bytes((await clients[0].get(address, "/", {}, max_body=10, timeout=5)).body) == b"ok"
        await clients[1].aclose()  # a connection closes: room for another
        for _ in range(100):
            try:
                assert bytes((await clients[2].get(address, "/", {}, max_body=10, timeout=5)).body) == b"ok"
                break
            except WireError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("no room after a connection closed")
    finally:
        for client in clients:
            await client.aclose()
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_a_stopping_server_closes_its_connections(tmp_path: Path) -> None:
    """A client holding a connection (as a peer does) is told at once when the node stops; without the
    close it would learn only at its idle timeout, and the server waited its graceful timeout first."""
    import asyncio

    async def app(scope: dict[str, object], receive: object, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    async with served_over_h3(app, tmp_path, "omx-stop") as served:
        answer = await served.client.get(served.address, "/", {}, max_body=10, timeout=10)
        assert bytes(answer.body) == b"ok"
        (_, conn), = served.client._connections.values()
        assert conn.closed is None
        served.stop.set()
        for _ in range(100):
            if conn.closed is not None:
                break
            await asyncio.sleep(0.05)
        assert conn.closed is not None, "the client was not told that the server closed"


async def test_a_request_the_client_gives_up_ends_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peer cancelling a transfer resets its stream: the app's further writes go nowhere (no error per
    write in the log), the app ends, and the connection serves the next request."""
    import asyncio
    import logging

    piece, pieces = b"x" * (1 << 20), 64
    ended: list[bool] = []

    async def app(scope: dict[str, object], receive: object, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            size = len(piece) * (pieces if scope["path"] == "/big" else 1)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(size).encode())]})
            for i in range(size // len(piece)):
                await send({"type": "http.response.body", "body": piece, "more_body": (i + 1) * len(piece) < size})
        finally:
            ended.append(True)

    caplog.set_level(logging.ERROR, logger="hypercorn.error")
    async with served_over_h3(app, tmp_path, "omx-reset") as served:
        client, address = served.client, served.address
        answer = await client.request(address, "GET", "/big", {}, b"", head_timeout=10)
        async for _ in answer.chunks():
            break
        await answer.aclose()  # resets the stream half-way through 64 MiB
        for _ in range(200):
            if ended:
                break
            await asyncio.sleep(0.05)
        assert ended, "the app went on waiting to write to a stream the client reset"
        again = await client.get(address, "/small", {}, max_body=len(piece), timeout=10)
        assert bytes(again.body) == piece
        assert not [r for r in caplog.records if r.name == "hypercorn.error"]
