"""The function registry: every API endpoint is a registered handler.

A handler has one shape::

    async def handler(body: RequestModel | None, call: Call) -> Result

where ``Result`` is a JSON-able value, a :class:`Reply`, a :class:`FileRange`
(a byte range of a file, sent zero-copy where the server allows), or an async
iterator of JSON-able values (streamed as NDJSON or SSE, per the spec's ``response``).
The runtime builds its HTTP app from the registry in one adapter; nothing here
knows about Starlette.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, final

from pydantic import BaseModel

if TYPE_CHECKING:
    from omx.functions.call import Call

__all__ = [
    "ACCEPTED",
    "Accepted",
    "Auth",
    "BodyKind",
    "ByteStream",
    "FileRange",
    "FunctionRegistry",
    "HandlerFunc",
    "HandlerSpec",
    "Reply",
    "ResponseKind",
]

Auth = Literal["public", "apikey", "peer", "admin"]
"""``admin``: like ``apikey`` when API keys are set, else loopback clients only."""
BodyKind = Literal["json", "raw", "none"]
ResponseKind = Literal["json", "ndjson", "sse", "text", "raw", "file", "websocket"]
HandlerFunc = Callable[[Any, "Call"], Awaitable[Any]]

_PATH_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?}")


@final
class Accepted:
    """Yielded first by a streaming handler once its request can no longer fail
    with an error status: the adapter then sends the response headers at once,
    while the first real item is still being computed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ACCEPTED"


ACCEPTED = Accepted()


@dataclass(frozen=True)
class Reply:
    """A response whose status, headers or raw body the handler chooses."""

    body: Any = None
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    media_type: str | None = None
    """None: JSON for dicts and models; set for raw bytes or text."""


@dataclass(eq=False)
class ByteStream:
    """A response body sent as its pieces come, unchanged (a response relayed from a peer).

    The adapter writes ``chunks`` byte for byte and closes the iterator when the
    client goes away (which closes whatever feeds it).
    """

    chunks: AsyncIterator[bytes]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    media_type: str = "application/octet-stream"


@dataclass(eq=False)
class FileRange:
    """``length`` bytes at ``offset`` of an open file, as a response body (``response="file"``).

    The adapter sends it without copying the bytes through Python where the
    server can (the ASGI zero-copy send extension: ``sendfile``), else in
    large pieces read straight from the file; either way it closes ``fd``
    once done, and calls ``on_sent`` with the bytes actually sent. A handler
    opens the file itself (:meth:`open`), so a file renamed or replaced after
    the handler returned is still the one it chose.
    """

    fd: int
    offset: int
    length: int
    headers: Mapping[str, str] = field(default_factory=dict)
    media_type: str = "application/octet-stream"
    status: int = 200
    on_sent: Callable[[int], None] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], offset: int, length: int, **fields: Any) -> FileRange:
        """Open ``path`` read-only and describe ``[offset, offset + length)`` of it."""
        if offset < 0 or length < 0:
            raise ValueError("a file range needs a non-negative offset and length")
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), offset, length, **fields)

    def close(self) -> None:
        """Release the file (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@dataclass(frozen=True)
class HandlerSpec:
    """How one endpoint is served.

    ``model_field`` names the request field that holds a model name; a
    ``model_routed`` handler runs on a node holding that model. A ``hop``
    handler also answers peers' signed hop requests (``X-Omx-Hop``) with this
    node's own answer, never forwarded again (model-routed handlers and the
    cluster-wide views). ``max_body``
    caps the bytes the adapter reads before the handler runs (None: the
    adapter's default for the body kind and auth, small for peer handlers).
    """

    name: str
    path: str
    methods: tuple[str, ...]
    func: HandlerFunc
    request: type[BaseModel] | None = None
    body: BodyKind = "json"
    response: ResponseKind = "json"
    auth: Auth = "apikey"
    model_field: str | None = None
    model_routed: bool = False
    hop: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    tags: tuple[str, ...] = ()
    max_body: int | None = None

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(_PATH_PARAM.findall(self.path))


class FunctionRegistry:
    """An ordered set of handler specs, unique by name and by (path, method)."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        self._routes: dict[tuple[str, str], str] = {}

    def add(self, spec: HandlerSpec) -> HandlerSpec:
        if spec.name in self._specs:
            raise ValueError(f"handler {spec.name!r} is already registered")
        for method in spec.methods:
            key = (spec.path, method.upper())
            if key in self._routes:
                raise ValueError(f"{method} {spec.path} is already served by {self._routes[key]!r}")
        for method in spec.methods:
            self._routes[(spec.path, method.upper())] = spec.name
        self._specs[spec.name] = spec
        return spec

    def remove(self, name: str) -> HandlerSpec:
        spec = self._specs.pop(name)
        for method in spec.methods:
            self._routes.pop((spec.path, method.upper()), None)
        return spec

    def handler(
        self,
        path: str,
        *,
        methods: tuple[str, ...] = ("POST",),
        name: str | None = None,
        request: type[BaseModel] | None = None,
        body: BodyKind | None = None,
        response: ResponseKind = "json",
        auth: Auth = "apikey",
        model_field: str | None = None,
        model_routed: bool = False,
        hop: bool | None = None,
        headers: Mapping[str, str] | None = None,
        tags: tuple[str, ...] = (),
        max_body: int | None = None,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator registering ``func`` as the handler of ``methods path`` (``hop``: ``model_routed`` unless set)."""

        def register(func: HandlerFunc) -> HandlerFunc:
            self.add(
                HandlerSpec(
                    name=name or func.__name__,
                    path=path,
                    methods=tuple(m.upper() for m in methods),
                    func=func,
                    request=request,
                    body=body or ("json" if request is not None else "none"),
                    response=response,
                    auth=auth,
                    model_field=model_field,
                    model_routed=model_routed,
                    hop=model_routed if hop is None else hop,
                    headers=dict(headers or {}),
                    summary=(func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else "",
                    tags=tags,
                    max_body=max_body,
                )
            )
            return func

        return register

    def get(self, name: str) -> HandlerSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[HandlerSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs



def is_stream(value: object) -> bool:
    """True for the async iterators a streaming handler returns."""
    return isinstance(value, AsyncIterator)
