"""Protocols shared across layers.

Lower layers consume these; upper layers implement them and inject the
implementations (``runtime/`` implements :class:`Engine` and
:class:`Scheduler`; ``functions/`` only ever sees the protocols). The value
types that cross these boundaries are frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from omx.types import BlobDigest, ChunkDigest, NodeId

__all__ = [
    "ChunkSource",
    "Completion",
    "CompletionChunk",
    "CompletionDone",
    "CompletionStream",
    "EmbedResult",
    "Engine",
    "LoadedModel",
    "ModelSpec",
    "PeerBlobState",
    "PeerTransport",
    "RegistryResponse",
    "RegistryTransport",
    "Runner",
    "SamplingOptions",
    "Scheduler",
]


# --------------------------------------------------------------------- engine


@dataclass(frozen=True)
class ModelSpec:
    """Everything a backend needs to load one model into a runner.

    ``key`` identifies the loaded instance (the scheduler reuses a runner when
    the key matches): it is the model name plus anything that forces a reload.
    """

    name: str
    model_path: Path
    digest: BlobDigest
    adapter_paths: tuple[Path, ...] = ()
    projector_paths: tuple[Path, ...] = ()
    num_ctx: int = 2048
    num_batch: int = 512
    num_thread: int | None = None
    num_gpu: int = 0
    num_parallel: int = 1
    use_mmap: bool = True
    size: int = 0

    @property
    def key(self) -> tuple[object, ...]:
        return (self.name, self.digest, self.adapter_paths, self.num_ctx, self.num_batch,
                self.num_thread, self.num_gpu)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling and stopping options, already merged (model PARAMETERs < request)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    num_predict: int = -1
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None
    """A GBNF grammar constraining the output (from ``format``), or None."""


@dataclass(frozen=True)
class Completion:
    """One generation request to a runner.

    ``prompt`` is the fully rendered prompt text. ``context`` holds tokens of a
    previous exchange (Ollama's ``context``) that precede the prompt.
    """

    prompt: str
    options: SamplingOptions = field(default_factory=SamplingOptions)
    context: tuple[int, ...] = ()
    add_bos: bool = True
    """Whether the tokenizer adds BOS; raw prompts that already carry one set False."""
    return_context: bool = False
    """Ask the runner to return the full token list (prompt + output) in ``done``."""


@dataclass(frozen=True)
class CompletionChunk:
    """A piece of generated text (one or more tokens, always valid UTF-8)."""

    text: str


@dataclass(frozen=True)
class CompletionDone:
    """The last item of a generation stream, with real measurements in ns."""

    done_reason: Literal["stop", "length", "load", "unload", "cancel"]
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    context: tuple[int, ...] = ()


@dataclass(frozen=True)
class EmbedResult:
    embeddings: tuple[tuple[float, ...], ...]
    prompt_eval_count: int


class CompletionStream(Protocol):
    """Text chunks of one generation, then one :class:`CompletionDone`.

    ``aclose`` before the end (client gone) stops the generation in the runner.
    """

    def __aiter__(self) -> AsyncIterator[CompletionChunk | CompletionDone]:
        ...

    def __anext__(self) -> Awaitable[CompletionChunk | CompletionDone]:
        ...

    async def aclose(self) -> None:
        ...


@runtime_checkable
class Runner(Protocol):
    """A loaded model living in its own process."""

    spec: ModelSpec

    def complete(self, request: Completion) -> CompletionStream:
        """Start a generation and return its stream.

        Raises :class:`omx.errors.RunnerCrashed` (now or from the stream) if the
        process dies.
        """
        ...

    async def embed(self, inputs: Sequence[str], *, normalize: bool, truncate: bool = True) -> EmbedResult:
        ...

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        ...

    async def detokenize(self, tokens: Sequence[int]) -> str:
        ...

    @property
    def alive(self) -> bool:
        ...

    async def close(self) -> None:
        ...


class Engine(Protocol):
    """A backend able to start runners (llama-cpp-python, ctransformers)."""

    name: str

    async def start(self, spec: ModelSpec) -> Runner:
        ...


@dataclass(frozen=True)
class LoadedModel:
    """A row of ``/api/ps``."""

    name: str
    digest: BlobDigest
    size: int
    expires_at: float | None
    """Unix time at which it unloads; None means never."""
    context_length: int
    active_requests: int = 0
    requests_served: int = 0
    pid: int | None = None
    """The runner process, where the backend runs one."""
    cancelled_generations: int = 0
    """Generations the runner stopped because their client went away."""
    preemptions: int = 0
    """Times a generation stepped aside for room in the runner's shared KV cache (``engine.kv_unified``)."""
    size_vram: int = 0
    """Bytes of the model (weights and KV cache) placed in GPU memory."""
    gpu_layers: int = 0
    """Layers offloaded to the GPU (one more than the block count: the output layer too)."""
    slots: int = 0
    """Requests it serves at once (0: not known)."""


class Scheduler(Protocol):
    """Loads models on demand and hands out runner slots.

    Its limits and queue length are read by the status handlers.
    """

    @property
    def engine(self) -> Engine:
        """The backend that starts its runners."""
        ...

    @property
    def max_loaded_models(self) -> int:
        ...

    @property
    def num_parallel(self) -> int:
        """Concurrent requests per loaded model."""
        ...

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a slot before new ones get 503."""
        ...

    @property
    def queued(self) -> int:
        """Requests waiting for a slot now."""
        ...

    def lease(self, spec: ModelSpec, *, keep_alive: float | None) -> AbstractAsyncContextManager[Runner]:
        """Wait (bounded) for a slot on a runner of ``spec``, loading it if needed.

        ``keep_alive`` is in seconds (None: the configured default; 0: unload
        right after this request; negative: keep forever). Raises
        :class:`omx.errors.ServiceBusy` when the queue is full.
        """
        ...

    async def load(self, spec: ModelSpec, *, keep_alive: float | None) -> float:
        """Load (or refresh the expiry of) ``spec`` without generating; returns load seconds."""
        ...

    async def unload(self, name: str) -> bool:
        ...

    def loaded(self) -> list[LoadedModel]:
        ...


# -------------------------------------------------------------------- storage


class ChunkSource(Protocol):
    """Somewhere chunks can be read from by their BLAKE3 digest (a peer, a file)."""

    async def read_chunk(self, blob: BlobDigest, chunk: ChunkDigest, offset: int, length: int) -> bytes:
        ...


@dataclass(frozen=True)
class PeerBlobState:
    """What a peer holds of one blob (``GET /api/peer/blobs/{digest}/index``).

    ``have`` is the bitmap of held chunks of a partial blob (bit ``i & 7`` of
    byte ``i >> 3``), None when the blob is complete there; ``index_json`` the
    peer's chunk index document (parse it with ``ChunkIndex.from_json``), None
    while a partial blob's index is unknown.
    """

    digest: BlobDigest
    size: int
    chunk_size: int
    complete: bool
    have: bytes | None
    index_json: bytes | None

    def has_chunk(self, i: int) -> bool:
        if self.have is None:
            return self.complete
        return 0 <= i >> 3 < len(self.have) and bool(self.have[i >> 3] & (1 << (i & 7)))


class PeerTransport(Protocol):
    """Reading blobs and manifests from peers (implemented in ``runtime/peer``).

    Errors: :class:`omx.errors.NotFound` when the peer does not hold (or will not
    serve: damaged) what was asked, :class:`omx.errors.InvalidRequest` with status
    416 for chunks out of range or not held yet, :class:`omx.errors.PeerError`
    for every network, protocol or server failure (worth retrying elsewhere).
    """

    async def blob_state(self, peer: NodeId, digest: BlobDigest) -> PeerBlobState:
        ...

    async def read_chunks(self, peer: NodeId, digest: BlobDigest, start: int, count: int, length: int, *,
                          into: bytearray | memoryview | None = None) -> bytes | bytearray | memoryview:
        """The ``length`` bytes of chunks ``[start, start + count)`` of ``digest``.

        ``into`` (exactly ``length`` bytes) is a buffer the transport may receive them into
        (and return); it is not written to after this returns or raises.
        """
        ...

    async def manifest(self, peer: NodeId, name: str) -> bytes:
        """The exact manifest bytes of model ``name`` (a full ``host/namespace/model:tag`` name)."""
        ...


@dataclass(frozen=True)
class RegistryResponse:
    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]
    url: str


class RegistryTransport(Protocol):
    """HTTP as the registry client needs it; implemented in runtime/."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | AsyncIterator[bytes] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-request transport deadline
    ) -> RegistryResponse:
        ...
