"""A Docker/OCI distribution registry for the tests, on a real loopback socket.

It serves manifests and blobs the tests generate, honours ``Range``, accepts
uploads (``POST …/blobs/uploads/`` then ``PATCH``/``PUT ?digest=``) and
manifest ``PUT``s, counts the bytes it sends per blob, and can be told to
misbehave: drop the connection part-way through a blob, serve a wrong byte,
redirect blob downloads to a second server (another 127.0.0.N host), or
demand basic or bearer-token authentication.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

__all__ = ["RegistryServer", "build_manifest"]

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
_PATH = re.compile(r"/v2/(?P<repo>.+?)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)\Z")
_UPLOAD = re.compile(r"/v2/(?P<repo>.+?)/blobs/uploads/(?P<id>[^/]*)\Z")
_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 206: "Partial Content", 307: "Temporary Redirect",
            400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 416: "Range Not Satisfiable"}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_manifest(config: bytes, layers: list[tuple[str, bytes]]) -> bytes:
    """The Docker v2 manifest Ollama writes for a config blob and ``(media type, bytes)`` layers."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": mt, "digest": digest_of(d), "size": len(d)} for mt, d in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class RegistryServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is ``http://host:port``."""

    host: str = "127.0.0.1"
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)
    """Blob bytes written to the socket, per digest (including bytes of dropped responses)."""
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    drop_after: dict[str, list[int]] = field(default_factory=dict)
    """Each GET of the digest takes the next offset of its list and closes the connection there."""
    corrupt: dict[str, int] = field(default_factory=dict)
    """The byte at this offset of the digest is served flipped."""
    before_blob: dict[str, Callable[[], None]] = field(default_factory=dict)
    """Called before each GET of the digest sends its bytes (e.g. to fill the receiver's disk)."""
    redirect_to: RegistryServer | None = None
    auth: tuple[str, str, str] | None = None
    """``("basic"|"bearer", user, password)``."""
    _tokens: set[str] = field(default_factory=set)
    _uploads: dict[str, bytearray] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    port: int = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> RegistryServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    # ------------------------------------------------------------ content

    def add_model(self, repo: str, tag: str, config: bytes, layers: list[tuple[str, bytes]]) -> bytes:
        """Serve a model; returns its manifest bytes."""
        for data in (config, *(d for _, d in layers)):
            self.blobs[digest_of(data)] = data
        manifest = build_manifest(config, layers)
        self.manifests[(repo, tag)] = manifest
        return manifest

    # ------------------------------------------------------------ HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                self.log.append((request.method, request.path, request.headers))
                keep = await self._dispatch(request, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, req: _Request, w: asyncio.StreamWriter) -> bool:
        if req.path == "/token":
            return await self._token(req, w)
        if req.path.startswith("/cdn/"):
            return await self._blob(req, w, req.path.removeprefix("/cdn/"))
        if not self._authorized(req):
            return await self._challenge(req, w)
        if req.path == "/v2/":
            return await _send(w, 200, b"{}")
        m = _UPLOAD.match(req.path)
        if m:
            return await self._upload(req, w, m.group("repo"), m.group("id"))
        m = _PATH.match(req.path)
        if m is None:
            return await _send(w, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"unknown path"}]}')
        repo, kind, ref = m.group("repo"), m.group("kind"), m.group("ref")
        if kind == "manifests":
            return await self._manifest(req, w, repo, ref)
        if self.redirect_to is not None and req.method == "GET":
            return await _send(w, 307, b"", {"Location": f"{self.redirect_to.url}/cdn/{ref}"})
        return await self._blob(req, w, ref)

    def _authorized(self, req: _Request) -> bool:
        if self.auth is None:
            return True
        scheme, user, password = self.auth
        got = req.headers.get("authorization", "")
        if scheme == "basic":
            return got == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return got.startswith("Bearer ") and got[7:] in self._tokens

    async def _challenge(self, req: _Request, w: asyncio.StreamWriter) -> bool:
        assert self.auth is not None
        if self.auth[0] == "basic":
            header = 'Basic realm="test"'
        else:
            m = _PATH.match(req.path) or _UPLOAD.match(req.path)
            repo = m.group("repo") if m else ""
            action = "pull" if req.method in ("GET", "HEAD") else "pull,push"
            header = f'Bearer realm="{self.url}/token",service="test-registry",scope="repository:{repo}:{action}"'
        return await _send(w, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                           {"WWW-Authenticate": header})

    async def _token(self, req: _Request, w: asyncio.StreamWriter) -> bool:
        assert self.auth is not None
        _, user, password = self.auth
        if req.headers.get("authorization") != "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode():
            return await _send(w, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
        token = secrets.token_hex(16)
        self._tokens.add(token)
        return await _send(w, 200, json.dumps({"token": token}).encode())

    async def _manifest(self, req: _Request, w: asyncio.StreamWriter, repo: str, ref: str) -> bool:
        if req.method == "PUT":
            doc = json.loads(req.body)
            for d in (doc["config"], *doc["layers"]):
                if d["digest"] not in self.blobs:
                    return await _send(w, 400, b'{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob"}]}')
            self.manifests[(repo, ref)] = req.body
            return await _send(w, 201, b"", {"Docker-Content-Digest": digest_of(req.body)})
        data = self.manifests.get((repo, ref))
        if data is None:
            return await _send(w, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
        headers = {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": digest_of(data)}
        return await _send(w, 200, b"" if req.method == "HEAD" else data, headers, length=len(data))

    async def _blob(self, req: _Request, w: asyncio.StreamWriter, digest: str) -> bool:
        data = self.blobs.get(digest)
        if data is None:
            return await _send(w, 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
        if req.method == "HEAD":
            return await _send(w, 200, b"", {"Docker-Content-Digest": digest}, length=len(data))
        if digest in self.corrupt:
            at = self.corrupt[digest]
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        start, end, status = 0, len(data), 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("range", ""))
        if rng:
            start = int(rng.group(1))
            end = min(len(data), int(rng.group(2)) + 1) if rng.group(2) else len(data)
            if start >= len(data) or end <= start:
                return await _send(w, 416, b"")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if digest in self.before_blob:
            self.before_blob[digest]()
        drops = self.drop_after.get(digest)
        stop = drops.pop(0) if drops else None
        w.write(_head(status, headers, end - start))
        if stop is not None and start < stop < end:
            w.write(data[start:stop])
            self.sent[digest] += stop - start
            await w.drain()
            w.transport.abort()
            return False
        w.write(data[start:end])
        self.sent[digest] += end - start
        await w.drain()
        return True

    async def _upload(self, req: _Request, w: asyncio.StreamWriter, repo: str, upload_id: str) -> bool:
        if req.method == "POST" and not upload_id:
            new = secrets.token_hex(8)
            self._uploads[new] = bytearray()
            return await _send(w, 202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{new}?state=x",
                                             "Docker-Upload-UUID": new, "Range": "0-0"})
        buf = self._uploads.get(upload_id)
        if buf is None:
            return await _send(w, 404, b'{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"upload"}]}')
        buf += req.body
        if req.method == "PATCH":
            return await _send(w, 202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{upload_id}",
                                             "Range": f"0-{len(buf) - 1}"})
        want = (req.query.get("digest") or [""])[0]
        if digest_of(bytes(buf)) != want:
            return await _send(w, 400, b'{"errors":[{"code":"DIGEST_INVALID","message":"digest mismatch"}]}')
        self.blobs[want] = bytes(self._uploads.pop(upload_id))
        return await _send(w, 201, b"", {"Location": f"/v2/{repo}/blobs/{want}", "Docker-Content-Digest": want})


def _head(status: int, headers: dict[str, str], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _send(w: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str] | None = None,
                *, length: int | None = None) -> bool:
    w.write(_head(status, {"Content-Type": "application/json", **(headers or {})},
                  len(body) if length is None else length) + body)
    await w.drain()
    return True


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    line = await reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        h = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not h:
            break
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(parts)
    split = urlsplit(target)
    return _Request(method, split.path, parse_qs(split.query), headers, body)
