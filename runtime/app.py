"""The one adapter between the function registry and Starlette.

Every route of the HTTP app comes from a :class:`HandlerSpec`: the adapter
builds the :class:`Call` from the request line and headers, has the
dispatcher check its credentials *before* any body byte is read (a refused
caller never makes the node read or parse a body), reads and validates the
body within its size limit, asks the dispatcher to run the handler, and
writes the result as JSON, NDJSON or SSE, or (for ``response="websocket"``)
sends each item of the handler's stream as one JSON text message. Errors are
mapped to ``{"error": "..."}`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from omx.errors import InvalidRequest, NotFound, OmxError, ServiceBusy
from omx.functions.call import Call, Services
from omx.functions.dispatch import Dispatcher
from omx.functions.registry import (
    Accepted,
    ByteStream,
    FileRange,
    FunctionRegistry,
    HandlerSpec,
    Reply,
    is_stream,
)
from omx.runtime.file_response import FileRangeResponse
from omx.runtime.peer.server import PEER_LISTENER as _PEER_LISTENER
from omx.runtime.peer.server import PEER_PREFIX as _PEER_PREFIX
from omx.runtime.request_body import (
    bounded_stream,
    check_length,
    describe_validation,
    parse_json,
    read_body,
    replay,
)

__all__ = ["build_app", "error_response", "json_response"]

log = logging.getLogger("omx.runtime")

MAX_JSON_BODY = 256 * 2**20
PEER_MAX_BODY = 2**20
"""Peer handlers take small JSON bodies; one needing more declares ``max_body`` on its spec."""
_NDJSON = "application/x-ndjson"
_SSE = "text/event-stream"


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(value), status_code=status, headers=headers, media_type="application/json")


_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                       404: "not_found_error", 429: "rate_limit_error", 503: "server_busy"}


def error_response(exc: OmxError, spec: HandlerSpec | None = None) -> Response:
    """``{"error": "..."}`` (Ollama's shape), or OpenAI's error object on /v1 handlers."""
    headers = {}
    if isinstance(exc, ServiceBusy):
        headers["Retry-After"] = str(exc.retry_after)
    if spec is not None and "openai" in spec.tags:
        kind = _OPENAI_ERROR_TYPES.get(exc.status, "api_error")
        body: Any = {"error": {"message": exc.message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": exc.message}
    return json_response(body, exc.status, headers)


def _encode_ndjson(item: Any) -> bytes:
    return dumps(item) + b"\n"


def _encode_sse(item: Any) -> bytes:
    if isinstance(item, str):  # a literal event line such as "[DONE]"
        return b"data: " + item.encode() + b"\n\n"
    return b"data: " + dumps(item) + b"\n\n"


def _stream_error(spec: HandlerSpec, exc: BaseException) -> Any:
    message = exc.message if isinstance(exc, OmxError) else "internal error"
    if spec.response == "sse":
        return {"error": {"message": message, "type": "server_error"}}
    return {"error": message}


async def _first_item(stream: AsyncIterator[Any]) -> tuple[bool, Any]:
    try:
        return True, await stream.__anext__()
    except StopAsyncIteration:
        return False, None


class _Stream(StreamingResponse):
    """A streamed body sent from the request's own task.

    Starlette's version runs the body and a disconnect listener in a task group
    per response; here one small watcher task cancels the sender when the client
    goes away, which keeps the first streamed line off an extra task switch.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: generation was stopped, nothing more to send
        finally:
            watcher.cancel()


def _streaming(spec: HandlerSpec, stream: AsyncIterator[Any], first: tuple[bool, Any],
               on_end: Callable[[], None]) -> Response:
    encode: Callable[[Any], bytes] = _encode_sse if spec.response == "sse" else _encode_ndjson

    async def body() -> AsyncIterator[bytes]:
        try:
            has_first, item = first
            if has_first and not isinstance(item, Accepted):
                yield encode(item)
            async for item in stream:
                if not isinstance(item, Accepted):
                    yield encode(item)
        except OmxError as exc:
            yield encode(_stream_error(spec, exc))
        except Exception as exc:  # noqa: BLE001 - the client must get a clean line, never a traceback
            log.exception("handler %s failed mid-stream", spec.name)
            yield encode(_stream_error(spec, exc))
        finally:
            on_end()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    media = _SSE if spec.response == "sse" else _NDJSON
    headers = {"Cache-Control": "no-cache", **spec.headers}
    return _Stream(body(), media_type=media, headers=headers)


def _render(spec: HandlerSpec, result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, FileRange):
        return FileRangeResponse(result, spec.headers)
    if isinstance(result, Reply):
        headers = {**spec.headers, **result.headers}
        if result.media_type is not None or isinstance(result.body, bytes | str):
            body = result.body if isinstance(result.body, bytes | str) else dumps(result.body)
            return Response(body, status_code=result.status, headers=headers,
                            media_type=result.media_type or "application/octet-stream")
        if result.body is None:
            return Response(b"", status_code=result.status, headers=headers)
        return json_response(result.body, result.status, headers)
    return json_response(result, 200, dict(spec.headers) or None)


def _client(conn: Request | WebSocket, dispatcher: Dispatcher) -> str | None:
    direct = conn.client.host if conn.client else None
    return dispatcher.client_address(direct, conn.headers.getlist("x-forwarded-for"))


def _raw_path(scope: Any) -> str:
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


async def _read_peer_body(request: Request, spec: HandlerSpec, call: Call, dispatcher: Dispatcher) -> Any:
    """Read a peer handler's or hop request's body (bounded, hashed while read), check the signature, then parse."""
    digest = hashlib.sha256()
    raw = await read_body(request, spec.max_body or (MAX_JSON_BODY if call.hop else PEER_MAX_BODY), digest)
    dispatcher.authorize(spec, call, digest.hexdigest())
    if spec.body == "raw":
        call.stream_body = lambda: replay(bytes(raw))
        return None
    if spec.body == "json":
        return parse_json(raw, spec)
    return None


def _relayed(result: ByteStream, on_end: Callable[[], None]) -> Response:
    """A peer's response sent on byte for byte; closing it (the client left) closes the peer's."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for piece in result.chunks:
                yield piece
        finally:
            on_end()
            aclose = getattr(result.chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    return _Stream(body(), status_code=result.status, headers=dict(result.headers), media_type=result.media_type)


def _endpoint(spec: HandlerSpec, services: Services, dispatcher: Dispatcher) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        started = time.perf_counter()
        dispatcher.started()
        reported = False

        def report(status: int) -> None:
            nonlocal reported
            if not reported:
                reported = True
                dispatcher.finished(spec.name, status, time.perf_counter() - started)

        response: Response | None = None
        try:
            response = await _serve(request, lambda: report(200))
            return response
        finally:
            if response is None:
                report(499)
            elif not isinstance(response, StreamingResponse):
                report(response.status_code)

    async def _serve(request: Request, on_stream_end: Callable[[], None]) -> Response:
        call = Call(
            services=services,
            spec=spec,
            method=request.method,
            path_params={k: str(v) for k, v in request.path_params.items()},
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            client=_client(request, dispatcher),
            stream_body=request.stream,
            is_disconnected=request.is_disconnected,
            path=_raw_path(request.scope),
        )
        response = await _answer(request, call, on_stream_end)
        if call.response_headers:
            response.headers.update(call.response_headers)
        return response

    async def _answer(request: Request, call: Call, on_stream_end: Callable[[], None]) -> Response:
        try:
            dispatcher.precheck(spec, call)  # headers only: nothing is read for a caller who will be refused
        except OmxError as exc:
            refused = error_response(exc, spec)
            if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
                refused.headers["Connection"] = "close"  # its body is left unread: the connection is done
            return refused
        if (_PEER_LISTENER in request.scope.get("extensions", {}) and not call.hop
                and not spec.path.startswith(_PEER_PREFIX)):
            return error_response(NotFound(f"404 page not found: {call.path} (this port serves peers only)"), spec)
        try:
            body: Any = None
            if spec.auth == "peer" or call.hop:
                body = await _read_peer_body(request, spec, call, dispatcher)
            elif spec.body == "json" and request.method not in ("GET", "HEAD"):
                raw = await read_body(request, spec.max_body or MAX_JSON_BODY)
                if spec.hop:
                    call.body_bytes = bytes(raw)  # sent on unchanged when a peer answers the call
                body = parse_json(raw, spec)
            elif spec.body == "json" and spec.request is not None:
                body = spec.request.model_validate({})
            elif spec.max_body is not None:
                check_length(request, spec.max_body)
                call.stream_body = bounded_stream(request, spec.max_body)
            result = await dispatcher.invoke(spec, body, call)
            if isinstance(result, ByteStream):
                return _relayed(result, on_stream_end)
            if is_stream(result):
                return _streaming(spec, result, await _first_item(result), on_stream_end)
            return _render(spec, result)
        except OmxError as exc:
            return error_response(exc, spec)
        except ClientDisconnect:
            return Response(b"", status_code=499)
        except ValidationError as exc:
            return error_response(InvalidRequest(describe_validation(exc)), spec)
        except Exception:  # noqa: BLE001 - never leak a traceback to a client
            log.exception("handler %s failed", spec.name)
            return json_response({"error": "internal error"}, 500)

    endpoint.__name__ = spec.name
    return endpoint


async def _drain_client(ws: WebSocket) -> None:
    """Read (and ignore) client messages until the client goes away."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _pump(ws: WebSocket, stream: AsyncIterator[Any]) -> None:
    async for item in stream:
        await ws.send_text(dumps(item).decode())


async def _refuse(ws: WebSocket, exc: OmxError, spec: HandlerSpec) -> None:
    """Answer the handshake with the error as HTTP (or a policy close where the server cannot)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(error_response(exc, spec))
    else:
        await ws.close(code=1008, reason=exc.message[:120])


def _ws_endpoint(spec: HandlerSpec, services: Services, dispatcher: Dispatcher) -> Callable[[WebSocket], Any]:
    """A WebSocket route: the handler's async iterator, one JSON text message per item."""

    async def endpoint(ws: WebSocket) -> None:
        started = time.perf_counter()
        dispatcher.started()
        status = 101
        try:
            call = Call(
                services=services, spec=spec, method="GET",
                path_params={k: str(v) for k, v in ws.path_params.items()},
                query=dict(ws.query_params),
                headers={k.lower(): v for k, v in ws.headers.items()},
                client=_client(ws, dispatcher),
                path=_raw_path(ws.scope),
            )
            try:
                dispatcher.authorize(spec, call)
                result = await dispatcher.invoke(spec, None, call)
            except OmxError as exc:
                status = exc.status
                await _refuse(ws, exc, spec)
                return
            stream = result if is_stream(result) else _single(result)
            await ws.accept()
            pump = asyncio.create_task(_pump(ws, stream), name=f"ws-{spec.name}")
            reader = asyncio.create_task(_drain_client(ws), name=f"ws-{spec.name}-reader")
            try:
                await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
                client_left = reader.done()
            finally:
                for task in (pump, reader):
                    task.cancel()
                await asyncio.gather(pump, reader, return_exceptions=True)
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not client_left:
                await _close_after(ws, spec, pump)
        finally:
            dispatcher.finished(spec.name, status, time.perf_counter() - started)

    endpoint.__name__ = spec.name
    return endpoint


async def _close_after(ws: WebSocket, spec: HandlerSpec, pump: asyncio.Task[None]) -> None:
    """Close the socket after the stream ended: normally, or with the error as a last message."""
    exc = None if pump.cancelled() else pump.exception()
    with contextlib.suppress(Exception):
        if exc is not None:
            if not isinstance(exc, OmxError):
                log.error("websocket handler %s failed", spec.name, exc_info=exc)
            await ws.send_text(dumps(_stream_error(spec, exc)).decode())
            await ws.close(code=1011)
        else:
            await ws.close(code=1000)


async def _single(value: Any) -> AsyncIterator[Any]:
    yield value


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"404 page not found: {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    if request.url.path.startswith("/v1/"):  # no route matched (e.g. a model name with a "/" escaped as %2F)
        kind = _OPENAI_ERROR_TYPES.get(exc.status_code, "api_error")
        return json_response({"error": {"message": message, "type": kind, "param": None, "code": None}},
                             exc.status_code)
    return json_response({"error": message}, exc.status_code)


def build_app(
    registry: FunctionRegistry,
    services: Services,
    dispatcher: Dispatcher,
    *,
    lifespan: Any = None,
) -> Starlette:
    """The HTTP app serving every handler of ``registry``."""
    routes: list[BaseRoute] = [
        WebSocketRoute(spec.path, _ws_endpoint(spec, services, dispatcher), name=spec.name)
        if spec.response == "websocket" else
        Route(spec.path, _endpoint(spec, services, dispatcher), methods=list(spec.methods), name=spec.name)
        for spec in registry
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
