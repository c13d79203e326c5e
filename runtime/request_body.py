"""Reading a request's body for the adapter (:mod:`omx.runtime.app`): bounded (413 past the limit, from the
declared length before anything is read), hashed as it arrives for signed peer calls, and parsed into a
handler's request model (400 naming the first fields that fail)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from omx.errors import InvalidRequest
from omx.functions.registry import HandlerSpec

__all__ = ["bounded_stream", "check_length", "describe_validation", "parse_json", "read_body", "replay", "too_large"]


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "invalid request: " + "; ".join(parts)


def too_large(limit: int) -> InvalidRequest:
    return InvalidRequest(f"request body too large (the limit is {limit} bytes)", status=413)


def check_length(request: Request, limit: int) -> None:
    """413 from the declared ``Content-Length`` alone, before reading anything."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError as exc:
        raise InvalidRequest("invalid Content-Length header") from exc
    if length > limit:
        raise too_large(limit)


async def read_body(request: Request, limit: int, digest: Any = None) -> bytearray:
    """The body, at most ``limit`` bytes (else 413), fed to ``digest`` (a hashlib object) as it arrives."""
    check_length(request, limit)
    body = bytearray()
    async for piece in request.stream():
        if len(body) + len(piece) > limit:
            raise too_large(limit)
        body += piece
        if digest is not None:
            digest.update(piece)
    return body


def parse_json(raw: bytearray, spec: HandlerSpec) -> Any:
    if spec.request is None:
        return None
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"invalid JSON in request body: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return spec.request.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc)) from exc


def bounded_stream(request: Request, limit: int) -> Callable[[], AsyncIterator[bytes]]:
    """``request.stream`` that fails with 413 past ``limit`` bytes (for raw bodies a handler streams)."""

    async def stream() -> AsyncIterator[bytes]:
        seen = 0
        async for piece in request.stream():
            seen += len(piece)
            if seen > limit:
                raise too_large(limit)
            yield piece

    return stream


async def replay(body: bytes) -> AsyncIterator[bytes]:
    if body:
        yield body
