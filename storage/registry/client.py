"""Pull and push models against an Ollama/OCI registry, reporting Ollama's progress lines.

Pull::

    pulling manifest
    pulling <digest[7:19]>   (digest, total, completed)   one line per update, per layer
    verifying sha256 digest
    writing manifest
    success

Push::

    retrieving manifest
    pushing <digest[7:19]>   (digest, total, completed)
    pushing manifest
    success

Layers are taken in manifest order with the config last, as Ollama does. Each
blob is verified against its sha256 while it streams in (see ``download.py``);
the manifest is written only once every blob is present and verified.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from omx.errors import InvalidRequest, NotFound, RegistryError, Unauthorized
from omx.protocols import RegistryResponse, RegistryTransport
from omx.types import BlobDigest

from ..blobs import BlobStore
from ..manifests import MANIFEST_MEDIA_TYPE, Layer, Manifest
from ..names import DEFAULT_HOST, ModelName
from ._io import discard, error_detail, header, read_body
from .auth import Authenticator, Credentials
from .download import BlobDownload, DownloadSettings
from .events import LayerProgress, ProgressEvent, Status
from .pending import FileManifests, ManifestAccess, PendingPulls
from .urls import RegistryEndpoint

__all__ = ["ACCEPT_MANIFESTS", "RegistryClient", "RegistryOptions"]

ACCEPT_MANIFESTS = ", ".join((
    MANIFEST_MEDIA_TYPE,
    "application/vnd.oci.image.manifest.v1+json",
))
"""What a pull accepts: Ollama's Docker v2 manifest, and the OCI manifest registries may convert it to."""

_MAX_MANIFEST = 4 << 20
_UPLOAD_PIECE = 1 << 20


@dataclass(frozen=True)
class RegistryOptions:
    """Settings of the registry client (``models.*`` of the config, plus retry tuning)."""

    default_registry: str = DEFAULT_HOST
    insecure: bool = False
    concurrency: int = 3
    download_timeout: float = 1800.0
    stall_timeout: float = 30.0
    request_timeout: float = 30.0
    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0

    @property
    def download(self) -> DownloadSettings:
        return DownloadSettings(self.concurrency, self.stall_timeout, self.request_timeout,
                                self.max_retries, self.backoff, self.max_backoff)


class RegistryClient:
    """Pulls models into, and pushes them from, one store."""

    def __init__(
        self,
        blobs: BlobStore,
        transport: RegistryTransport,
        options: RegistryOptions | None = None,
        *,
        manifests: ManifestAccess | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.blobs = blobs
        self.transport = transport
        self.options = options or RegistryOptions()
        self.manifests = manifests or FileManifests(blobs.root, blobs.extra_roots)
        self.pending = PendingPulls(blobs.root)
        self._sleep = sleep
        self.on_bytes = on_bytes
        """Told the size of every chunk downloaded from a registry (metrics)."""
        self._blob_locks: dict[BlobDigest, asyncio.Lock] = {}

    def parse(self, model: str) -> ModelName:
        return ModelName.parse(model, default_host=self.options.default_registry)

    def _endpoint(self, name: ModelName, insecure: bool | None) -> RegistryEndpoint:
        return RegistryEndpoint.for_model(name, insecure=self.options.insecure or bool(insecure))

    # ------------------------------------------------------------------ pull

    async def pull(
        self, model: str, *, insecure: bool | None = None, credentials: Credentials | None = None
    ) -> AsyncIterator[ProgressEvent]:
        """Pull ``model``, yielding progress; raises an :class:`OmxError` on failure."""
        name = self.parse(model)
        endpoint = self._endpoint(name, insecure)
        auth = Authenticator(self.transport, credentials)
        yield Status("pulling manifest")
        data = await self._fetch_manifest(auth, endpoint, name)
        manifest = Manifest.from_bytes(data)
        await asyncio.to_thread(self.pending.record, name, data)
        for layer in (*manifest.layers, manifest.config):
            async for event in self._pull_blob(auth, endpoint, layer):
                yield event
        yield Status("verifying sha256 digest")
        for digest in manifest.blobs:
            if not await asyncio.to_thread(self.blobs.has, digest):
                raise RegistryError(f"blob {digest} is missing after the download")
        yield Status("writing manifest")
        await asyncio.to_thread(self.manifests.write_manifest, name, data)
        await asyncio.to_thread(self.pending.forget, name)
        yield Status("success")

    async def _fetch_manifest(self, auth: Authenticator, endpoint: RegistryEndpoint, name: ModelName) -> bytes:
        response = await self._request(auth, "GET", endpoint.manifest_url, endpoint.pull_scope,
                                       headers={"Accept": ACCEPT_MANIFESTS})
        data = await read_body(response, limit=_MAX_MANIFEST)
        if response.status == 404:
            raise NotFound(f"pull model manifest: model '{name.display}' not found on {endpoint.host}")
        if response.status != 200:
            raise _status_error(response.status, f"pull model manifest from {endpoint.host}", data)
        return data

    async def _pull_blob(
        self, auth: Authenticator, endpoint: RegistryEndpoint, layer: Layer
    ) -> AsyncIterator[ProgressEvent]:
        lock = self._blob_locks.setdefault(layer.digest, asyncio.Lock())
        async with lock:
            if await asyncio.to_thread(self.blobs.has, layer.digest):
                yield LayerProgress("pulling", layer.digest, layer.size, layer.size)
                return
            progressed = asyncio.Event()
            job = BlobDownload(auth, endpoint.blob_url(layer.digest), endpoint.pull_scope, self.blobs,
                               layer.digest, layer.size, self.options.download, on_progress=progressed.set,
                               on_bytes=self.on_bytes, sleep=self._sleep)

            async def run() -> None:
                try:
                    async with asyncio.timeout(self.options.download_timeout):
                        await job.run()
                except TimeoutError as e:
                    raise RegistryError(
                        f"download of {layer.digest} timed out after {self.options.download_timeout:g} s"
                    ) from e

            async for _ in _track(run(), progressed):
                yield LayerProgress("pulling", layer.digest, layer.size, job.completed)
            yield LayerProgress("pulling", layer.digest, layer.size, layer.size)

    # ------------------------------------------------------------------ push

    async def push(
        self, model: str, *, insecure: bool | None = None, credentials: Credentials | None = None
    ) -> AsyncIterator[ProgressEvent]:
        """Upload the blobs the registry lacks, then the manifest, yielding progress."""
        name = self.parse(model)
        endpoint = self._endpoint(name, insecure)
        auth = Authenticator(self.transport, credentials)
        yield Status("retrieving manifest")
        data = await asyncio.to_thread(self.manifests.read_manifest, name)
        manifest = Manifest.from_bytes(data)
        for layer in (*manifest.layers, manifest.config):
            async for event in self._push_blob(auth, endpoint, layer):
                yield event
        yield Status("pushing manifest")
        response = await self._request(
            auth, "PUT", endpoint.manifest_url, endpoint.push_scope,
            headers={"Content-Type": manifest.media_type or MANIFEST_MEDIA_TYPE}, body=data,
        )
        answer = await read_body(response, limit=1 << 20)
        if response.status not in (200, 201, 202):
            raise _status_error(response.status, f"push manifest to {endpoint.host}", answer)
        yield Status("success")

    async def _push_blob(
        self, auth: Authenticator, endpoint: RegistryEndpoint, layer: Layer
    ) -> AsyncIterator[ProgressEvent]:
        path = await asyncio.to_thread(self.blobs.path, layer.digest)
        head = await self._request(auth, "HEAD", endpoint.blob_url(layer.digest), endpoint.push_scope)
        await discard(head)
        if head.status == 200:
            yield LayerProgress("pushing", layer.digest, layer.size, layer.size)
            return
        start = await self._request(auth, "POST", endpoint.uploads_url, endpoint.push_scope)
        answer = await read_body(start, limit=1 << 20)
        location = header(start, "location")
        if start.status not in (201, 202) or not location:
            raise _status_error(start.status, f"start upload to {endpoint.host}", answer)
        url = endpoint.resolve(location)
        url += ("&" if "?" in url else "?") + f"digest={layer.digest}"
        sent = [0]
        progressed = asyncio.Event()

        async def upload() -> None:
            response = await auth.request(
                "PUT", url, scope=endpoint.push_scope, body=_file_body(path, sent, progressed),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(layer.size)},
                request_timeout=self.options.download_timeout, retry_auth=False,
            )
            body = await read_body(response, limit=1 << 20)
            if response.status not in (201, 204):
                raise _status_error(response.status, f"upload {layer.digest} to {endpoint.host}", body)

        yield LayerProgress("pushing", layer.digest, layer.size, 0)
        async for _ in _track(upload(), progressed):
            yield LayerProgress("pushing", layer.digest, layer.size, sent[0])
        yield LayerProgress("pushing", layer.digest, layer.size, layer.size)

    # ------------------------------------------------------------------ shared

    async def _request(
        self, auth: Authenticator, method: str, url: str, scope: str, *,
        headers: dict[str, str] | None = None, body: bytes | None = None,
    ) -> RegistryResponse:
        """A small request, retried with backoff on network errors and 5xx answers."""
        failures = 0
        while True:
            try:
                response = await auth.request(method, url, scope=scope, headers=headers, body=body,
                                              request_timeout=self.options.request_timeout)
            except (OSError, TimeoutError) as e:
                failures += 1
                if failures > self.options.max_retries:
                    raise RegistryError(f"cannot reach the registry at {url}: {e or type(e).__name__}") from e
            else:
                if response.status < 500 or failures >= self.options.max_retries:
                    return response
                await discard(response)
                failures += 1
            await self._sleep(min(self.options.max_backoff, self.options.backoff * 2 ** (failures - 1)))


async def _track(work: Awaitable[None], progressed: asyncio.Event) -> AsyncIterator[None]:
    """Run ``work``, yielding once each time ``progressed`` is set; re-raises its failure."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            waiter = asyncio.ensure_future(progressed.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if progressed.is_set():
                progressed.clear()
                yield
        task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _file_body(path: Path, sent: list[int], progressed: asyncio.Event) -> AsyncIterator[bytes]:
    """A blob file as an upload body, counting the bytes handed to the transport."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        while True:
            piece = await asyncio.to_thread(os.read, fd, _UPLOAD_PIECE)
            if not piece:
                return
            yield piece
            sent[0] += len(piece)
            progressed.set()
    finally:
        os.close(fd)


def _status_error(status: int, what: str, body: bytes) -> RegistryError | Unauthorized | InvalidRequest:
    detail = error_detail(body)
    message = f"{what}: registry answered {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return Unauthorized(message, status=status)
    if 400 <= status < 500 and status != 429:
        return InvalidRequest(message)
    return RegistryError(message)
