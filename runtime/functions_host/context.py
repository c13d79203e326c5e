"""The node side of a function's ``ctx``: model calls through the node's own dispatcher, and log lines.

``ctx.generate`` / ``ctx.chat`` / ``ctx.embed`` arrive here from a worker's
pipe as a kind and a JSON body. The body is validated by the built-in
handler's own request model and run by the dispatcher exactly as a client
request to ``/api/generate`` (``/api/chat``, ``/api/embed``) would be: the
router sends it to the best node holding the model. The call is made inside
the node, so no credential is needed and none ever enters the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from omx.errors import InvalidRequest, OmxError
from omx.functions.call import Call, Services
from omx.functions.dispatch import Dispatcher
from omx.functions.registry import ByteStream, FunctionRegistry, HandlerSpec, Reply, is_stream
from omx.runtime.functions_host.observe import FunctionLogs

__all__ = ["MODEL_PATHS", "NodeContextHost"]

MODEL_PATHS = {"generate": "/api/generate", "chat": "/api/chat", "embed": "/api/embed"}
_MAX_REPLY = 64 << 20


def _handler(registry: FunctionRegistry, path: str) -> HandlerSpec:
    for spec in registry:
        if spec.path == path and "POST" in spec.methods:
            return spec
    raise LookupError(f"no built-in handler serves POST {path}")


def _error_of(status: int, raw: bytes) -> OmxError:
    try:
        doc = json.loads(raw)
        message = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        message = None
    return OmxError(str(message or f"status {status}"), status=status)


class NodeContextHost:
    """Implements the sandbox's ``ContextHost`` for one node.

    ``version_of`` names the version a function serves here (for its log lines).
    """

    def __init__(self, node_id: str, registry: FunctionRegistry, dispatcher: Dispatcher,
                 services: Callable[[], Services | None], logs: FunctionLogs,
                 version_of: Callable[[str], str]) -> None:
        self.node_id = node_id
        self._specs = {kind: _handler(registry, path) for kind, path in MODEL_PATHS.items()}
        self._dispatcher = dispatcher
        self._services = services
        self._logs = logs
        self._version_of = version_of

    async def model_call(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer of ``/api/<kind>`` for ``body``; raises OmxError as the endpoint would."""
        spec = self._specs.get(kind)
        services = self._services()
        if spec is None or spec.request is None:
            raise InvalidRequest(f"unknown model call {kind!r}")
        if services is None:
            raise OmxError("this node is not serving yet", status=503)
        if not isinstance(body, dict):
            raise InvalidRequest("a model call's body must be an object")
        try:
            request = spec.request.model_validate({**body, "stream": False} if kind != "embed" else body)
        except ValidationError as exc:
            raise InvalidRequest(f"invalid {kind} request: {exc.errors()[0]['msg']}") from exc
        call = Call(services=services, spec=spec, method="POST", path=spec.path,
                    headers={"content-type": "application/json"}, client="127.0.0.1")
        result = await self._dispatcher.invoke(spec, request, call)
        return await _as_json(result)

    def log(self, function: str, line: str) -> None:
        self._logs.add(function, self._version_of(function), line)


async def _as_json(result: Any) -> dict[str, Any]:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json", exclude_none=True)
    if isinstance(result, dict):
        return result
    if isinstance(result, Reply):
        raw = result.body if isinstance(result.body, bytes) else json.dumps(result.body).encode()
        if result.status >= 400:
            raise _error_of(result.status, raw)
        doc = json.loads(raw)
        if isinstance(doc, dict):
            return doc
    if isinstance(result, ByteStream):  # a relayed stream: should not happen with stream false, read it whole
        body = bytearray()
        async for piece in result.chunks:
            body += piece
            if len(body) > _MAX_REPLY:
                raise OmxError("model reply too large", status=502)
        lines = [json.loads(line) for line in bytes(body).splitlines() if line.strip()]
        if lines and isinstance(lines[-1], dict):
            return lines[-1]
    if is_stream(result):
        last: Any = None
        async for item in result:
            last = item
        if isinstance(last, dict):
            return last
    raise OmxError("the model call gave no JSON object", status=502)
