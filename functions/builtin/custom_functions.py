"""Custom functions: deploy, list, logs, rollback, remove, and serving ``/fn/...``.

``POST /api/functions`` ``{"filename", "source"}``
    Validate the file in a sandbox and serve its functions on every node
    (admin): 201 ``{"functions": [{"name", "version", "path"}]}``; 400 with
    the line for a source that does not import, 413 over 1 MB, 409 for a name
    or path another file (or a built-in) owns.
``GET /api/functions`` / ``GET /api/functions/{name}``
    Every function (or one) with the nodes serving it and its figures.
``GET /api/functions/{name}/logs?follow=true|false``
    ``{"logs": [{"time", "node", "version", "line"}]}``, or with ``follow`` an
    NDJSON stream of those rows that stays open.
``POST /api/functions/{name}/rollback`` / ``DELETE /api/functions/{name}``
    Back to the previous version (409 when there is none) / removed from every
    node (admin).
``/fn/<path>``
    Any method a function accepts: its JSON answer, or the items of a
    generator handler as NDJSON (SSE when the client sends ``Accept:
    text/event-stream``). ``X-Omx-Node`` names the node that ran it.

The peer endpoints (HMAC-signed, members only) carry the distribution: a
node's table, announcements of a change, the sources by version, and a
node's log lines of a function.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import Field, StrictStr

from omx.errors import InvalidRequest, NotFound, OmxError
from omx.functions.call import Call
from omx.functions.custom_view import CustomFunctions, deployed_json, function_json, log_json
from omx.functions.registry import ACCEPTED, ByteStream, FunctionRegistry, Reply
from omx.functions.router import NODE_HEADER
from omx.functions.schemas import _Body
from omx.storage.functions_store import MAX_SOURCE_BYTES

__all__ = ["CALL_PATH", "DeployRequest", "MAX_CALL_BODY", "MAX_DEPLOY_BODY", "MAX_SOURCE_BYTES", "register"]

MAX_DEPLOY_BODY = 8 << 20
"""The deploy body the adapter reads (a 1 MB source, JSON-escaped, fits; larger ones get 413 either way)."""
MAX_CALL_BODY = 16 << 20
CALL_PATH = "/fn/{path:path}"
FUNCTION_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_NDJSON = "application/x-ndjson"
_SSE = "text/event-stream"


class DeployRequest(_Body):
    """Body of ``POST /api/functions``."""

    filename: StrictStr = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    source: StrictStr = Field(max_length=MAX_DEPLOY_BODY)


def _view(call: Call) -> CustomFunctions:
    view = call.services.functions
    if view is None:
        raise OmxError("this node does not run custom functions", status=503)
    return view


async def deploy(body: DeployRequest, call: Call) -> Reply:
    """Deploy a Python file of functions to every node of the cluster."""
    source = body.source.encode()
    if len(source) > MAX_SOURCE_BYTES:
        raise InvalidRequest(f"function source is {len(source)} bytes; the limit is {MAX_SOURCE_BYTES} bytes",
                             status=413)
    done = await _view(call).deploy(body.filename, source)
    return Reply({"functions": [deployed_json(d) for d in done]}, status=201)


async def listing(_body: None, call: Call) -> dict[str, Any]:
    """Every custom function: version, path, serving nodes, calls, errors, latency."""
    return {"functions": [function_json(f) for f in await _view(call).listing()]}


async def one(_body: None, call: Call) -> dict[str, Any]:
    """One custom function (404 when unknown)."""
    name = call.path_params["name"]
    for facts in await _view(call).listing():
        if facts.name == name:
            return function_json(facts)
    raise NotFound(f"function '{name}' not found")


def _flag(call: Call, name: str) -> bool:
    text = call.query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise InvalidRequest(f"query parameter '{name}' must be true or false")
    return text in ("true", "1")


async def logs(_body: None, call: Call) -> Any:
    """The function's log lines from every node; ``follow=true`` streams new ones as NDJSON."""
    follow = _flag(call, "follow")
    view, name = _view(call), call.path_params["name"]
    if not view.known(name):
        raise NotFound(f"function '{name}' not found")
    lines = view.logs(name, follow=follow)
    if not follow:
        return {"logs": [log_json(line) async for line in lines]}
    return _follow(lines)


async def _follow(lines: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield ACCEPTED  # headers go out now; lines come as the function logs them
    try:
        async for line in lines:
            yield log_json(line)
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


async def rollback(_body: None, call: Call) -> dict[str, Any]:
    """Return a function to its previous version on every node."""
    return deployed_json(await _view(call).rollback(call.path_params["name"]))


async def remove(_body: None, call: Call) -> dict[str, Any]:
    """Remove a function from every node."""
    await _view(call).remove(call.path_params["name"])
    return {"status": "deleted"}


# ------------------------------------------------------------------ invoking


async def _read_json(call: Call) -> Any:
    raw = bytearray()
    async for piece in call.stream_body():
        raw += piece
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc.msg}") from exc


def _encode(item: Any, sse: bool) -> bytes:
    data = orjson.dumps(item, option=orjson.OPT_NON_STR_KEYS)
    return b"data: " + data + b"\n\n" if sse else data + b"\n"


async def _encoded(stream: AsyncIterator[Any], sse: bool) -> AsyncIterator[bytes]:
    try:
        async for item in stream:
            yield _encode(item, sse)
    except OmxError as exc:
        yield _encode({"error": exc.message}, sse)
    except (TypeError, orjson.JSONEncodeError) as exc:
        yield _encode({"error": f"the function yielded a value that is not JSON: {exc}"}, sse)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def invoke(_body: None, call: Call) -> Any:
    """Run the custom function deployed at this path."""
    view = _view(call)
    call.response_headers[NODE_HEADER] = view.node_id
    body = await _read_json(call)
    path = "/fn/" + call.path_params["path"]
    result = await view.invoke(path, call.method, body, call.headers)
    if result.stream is None:
        try:
            data = orjson.dumps(result.value, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise OmxError(f"the function returned a value that is not JSON: {exc}", status=502) from exc
        return Reply(data, headers=dict(result.headers), media_type="application/json")
    sse = _SSE in call.headers.get("accept", "")
    return ByteStream(_encoded(result.stream, sse), headers={"Cache-Control": "no-cache", **result.headers},
                      media_type=_SSE if sse else _NDJSON)


# ------------------------------------------------------------------ peers


async def peer_table(_body: None, call: Call) -> dict[str, Any]:
    """This node's function table, what it serves, and its figures."""
    return _view(call).peer_table()


async def peer_announce(_body: None, call: Call) -> Reply:
    """A peer changed its function table: merge it."""
    raw = bytearray()
    async for piece in call.stream_body():
        raw += piece
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc.msg}") from exc
    _view(call).peer_announce(call.peer or "", doc)
    return Reply({"status": "accepted"}, status=202)


async def peer_source(_body: None, call: Call) -> Reply:
    """A function source by version (its BLAKE3 hex)."""
    data = await _view(call).peer_source(call.path_params["version"])
    return Reply(data, media_type="text/x-python")


async def peer_logs(_body: None, call: Call) -> dict[str, Any]:
    """This node's log lines of a function after a sequence number."""
    text = call.query.get("after", "0")
    if not text.isdigit() or len(text) > 18:
        raise InvalidRequest("query parameter 'after' must be a non-negative integer")
    lines = _view(call).peer_logs(call.path_params["name"], int(text))
    return {"logs": [{**log_json(line), "seq": line.seq} for line in lines]}


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    tags = ("functions",)
    h("/api/functions", request=DeployRequest, auth="admin", name="function_deploy", tags=tags,
      max_body=MAX_DEPLOY_BODY)(deploy)
    h("/api/functions", methods=("GET",), name="function_list", tags=tags)(listing)
    h("/api/functions/{name}", methods=("GET",), name="function_get", tags=tags)(one)
    h("/api/functions/{name}", methods=("DELETE",), auth="admin", name="function_remove", tags=tags)(remove)
    h("/api/functions/{name}/logs", methods=("GET",), response="ndjson", name="function_logs", tags=tags)(logs)
    h("/api/functions/{name}/rollback", methods=("POST",), auth="admin", name="function_rollback",
      tags=tags)(rollback)
    h(CALL_PATH, methods=FUNCTION_METHODS, body="raw", response="raw", name="function_call", tags=tags,
      max_body=MAX_CALL_BODY)(invoke)
    peer = ("peer",)
    h("/api/peer/functions", methods=("GET",), auth="peer", name="peer_functions", tags=peer)(peer_table)
    h("/api/peer/functions/announce", methods=("POST",), auth="peer", body="raw", name="peer_functions_announce",
      tags=peer, max_body=4 << 20)(peer_announce)
    h("/api/peer/functions/sources/{version}", methods=("GET",), auth="peer", response="raw",
      name="peer_function_source", tags=peer)(peer_source)
    h("/api/peer/functions/{name}/logs", methods=("GET",), auth="peer", name="peer_function_logs",
      tags=peer)(peer_logs)
