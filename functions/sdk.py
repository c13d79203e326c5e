"""The authoring API of custom functions: ``from omx.functions import function, Context``.

A custom function is a module-level Python function decorated with
:func:`function`. It takes the request body (a ``dict``, or a pydantic model
that the body is validated against) and, optionally, a :class:`Context`; it
may be sync or async and returns a JSON-able value, or a (sync or async)
generator whose items are streamed::

    from omx.functions import function, Context

    @function(timeout=10, memory_mb=256, concurrency=4)      # name "shout", path "/fn/shout"
    async def shout(body: dict, ctx: Context) -> dict:
        return {"text": body["text"].upper()}

The node runs it in a sandboxed worker process; this module is what that
worker imports, so it stays light (no pydantic, no web framework).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

__all__ = ["Context", "ContextChannel", "FunctionSpec", "ModelCallError", "function"]

SPEC_ATTRIBUTE = "__omx_function__"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PATH = re.compile(r"/fn/[A-Za-z0-9_./-]+")
_MAX_LOG_LINE = 8192

F = TypeVar("F", bound=Callable[..., Any])


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, not {value!r}")
    return float(value)


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, not {value}")
    return value


@dataclass(frozen=True)
class FunctionSpec:
    """What the decorator declares about one function; every constructor validates it."""

    name: str
    path: str
    methods: tuple[str, ...] = ("POST",)
    timeout: float = 10.0
    memory_mb: int = 256
    concurrency: int = 4
    qualname: str = ""
    """The function's attribute name in its module (how the worker finds it again)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"function name {self.name!r} must match [a-z0-9][a-z0-9_-]{{0,62}}")
        path = self.path
        if (not isinstance(path, str) or not _PATH.fullmatch(path) or ".." in path or "//" in path
                or len(path) > 256):
            raise ValueError(f"function path {path!r} must live under /fn/ and use only A-Z a-z 0-9 _ . / - "
                             "(no '..', no '//')")
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError("methods must be a non-empty list of HTTP methods")
        methods: list[str] = []
        for method in self.methods:
            upper = method.upper() if isinstance(method, str) else method
            if upper not in METHODS:
                raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
            if upper not in methods:
                methods.append(upper)
        object.__setattr__(self, "methods", tuple(methods))
        timeout = _number(self.timeout, "timeout")
        if not 0 < timeout <= 600:
            raise ValueError(f"timeout must be more than 0 and at most 600 seconds, not {self.timeout}")
        object.__setattr__(self, "timeout", timeout)
        _integer(self.memory_mb, "memory_mb", 16, 65536)
        _integer(self.concurrency, "concurrency", 1, 64)
        if not isinstance(self.qualname, str):
            raise ValueError("qualname must be a string")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "methods": list(self.methods), "timeout": self.timeout,
                "memory_mb": self.memory_mb, "concurrency": self.concurrency, "qualname": self.qualname}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FunctionSpec:
        """The spec :meth:`to_json` wrote; ValueError when ``data`` is not one."""
        if not isinstance(data, Mapping):
            raise ValueError("a function spec must be an object")
        try:
            methods = data.get("methods", ["POST"])
            return cls(name=data["name"], path=data["path"],
                       methods=tuple(methods) if isinstance(methods, list | tuple) else methods,
                       timeout=data.get("timeout", 10.0), memory_mb=data.get("memory_mb", 256),
                       concurrency=data.get("concurrency", 4), qualname=data.get("qualname", ""))
        except KeyError as exc:
            raise ValueError(f"a function spec needs {exc.args[0]!r}") from None


@overload
def function(fn: F, /) -> F: ...


@overload
def function(fn: None = None, /, *, name: str | None = None, path: str | None = None,
             methods: tuple[str, ...] | list[str] = ("POST",), timeout: float = 10, memory_mb: int = 256,
             concurrency: int = 4) -> Callable[[F], F]: ...


def function(fn: F | None = None, /, *, name: str | None = None, path: str | None = None,
             methods: tuple[str, ...] | list[str] = ("POST",), timeout: float = 10, memory_mb: int = 256,
             concurrency: int = 4) -> F | Callable[[F], F]:
    """Declare a custom function: ``@function`` or ``@function(name=..., path=..., ...)``.

    ``name`` defaults to the Python function's name and ``path`` to
    ``/fn/<name>``; ``timeout`` is in seconds (at most 600); ``memory_mb``
    limits the worker process's whole address space, Python and the module's
    imports included (some 30-50 MB: a deploy below what the module needs is
    refused); ``concurrency`` is the most calls (and worker processes) at once
    on one node. Bad arguments raise ValueError. The
    function is returned unchanged, with its :class:`FunctionSpec` attached.
    """

    def decorate(target: F) -> F:
        if not callable(target):
            raise ValueError("@function decorates a function")
        fname = name if name is not None else getattr(target, "__name__", "")
        spec = FunctionSpec(name=fname, path=path if path is not None else f"/fn/{fname}",
                            methods=tuple(methods) if isinstance(methods, list | tuple) else methods,
                            timeout=timeout, memory_mb=memory_mb, concurrency=concurrency,
                            qualname=getattr(target, "__qualname__", fname))
        setattr(target, SPEC_ATTRIBUTE, spec)
        return target

    if fn is not None:
        return decorate(fn)
    return decorate


class ModelCallError(Exception):
    """A ``ctx.generate`` / ``ctx.chat`` / ``ctx.embed`` call failed; ``status`` is the HTTP status it had.

    Left uncaught, the function's caller gets that status and message.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class ContextChannel(Protocol):
    """How a :class:`Context` reaches the node (the worker's pipe)."""

    async def request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def log(self, line: str) -> None: ...


class Context:
    """What a function sees of the node serving it. Built by the worker for each call."""

    def __init__(self, *, node: str, headers: Mapping[str, str], channel: ContextChannel) -> None:
        self.node = node
        """The serving node's id."""
        self.headers = headers
        """The request's headers, lower-case names (credentials and ``X-Omx-*`` removed)."""
        self._channel = channel

    async def generate(self, *, model: str, prompt: str, options: dict[str, Any] | None = None,
                       **fields: Any) -> dict[str, Any]:
        """The non-streamed body ``POST /api/generate`` answers, routed through the cluster."""
        return await self._call("generate", {"model": model, "prompt": prompt}, options, fields)

    async def chat(self, *, model: str, messages: list[dict[str, Any]], options: dict[str, Any] | None = None,
                   **fields: Any) -> dict[str, Any]:
        """The non-streamed body ``POST /api/chat`` answers."""
        return await self._call("chat", {"model": model, "messages": messages}, options, fields)

    async def embed(self, *, model: str, input: str | list[str], **fields: Any) -> dict[str, Any]:
        """The body ``POST /api/embed`` answers."""
        return await self._call("embed", {"model": model, "input": input}, None, fields)

    def log(self, *args: Any) -> None:
        """One log line (the arguments joined by spaces), collected per function by the node."""
        line = " ".join(str(arg) for arg in args)
        self._channel.log(line[:_MAX_LOG_LINE])

    async def _call(self, kind: str, body: dict[str, Any], options: dict[str, Any] | None,
                    fields: dict[str, Any]) -> dict[str, Any]:
        request = {**fields, **body, "stream": False}
        if options is not None:
            request["options"] = options
        return await self._channel.request(kind, request)
