"""``GET /openapi.json``: the OpenAPI document generated from the registry."""

from __future__ import annotations

from typing import Any

import omx
from omx.functions.call import Call
from omx.functions.registry import FunctionRegistry, HandlerSpec

__all__ = ["openapi_document", "register"]

_MEDIA = {"json": "application/json", "ndjson": "application/x-ndjson", "sse": "text/event-stream",
          "text": "text/plain", "raw": "application/octet-stream", "file": "application/octet-stream",
          "websocket": "application/json"}


def _operation(spec: HandlerSpec, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary or spec.name,
        "tags": list(spec.tags),
        "responses": {
            "200": {"description": "OK", "content": {_MEDIA[spec.response]: {}}},
            "400": {"description": "Bad request", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }
    if spec.path_params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                            for p in spec.path_params]
    if spec.request is not None:
        schema = spec.request.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[spec.request.__name__] = schema
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{spec.request.__name__}"}}}}
    elif spec.body == "raw":
        op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
    if spec.auth in ("apikey", "admin"):
        op["security"] = [{}, {"bearer": []}]
    elif spec.auth == "peer":
        op["security"] = [{"peer": []}]
    return op


def openapi_document(registry: FunctionRegistry) -> dict[str, Any]:
    """An OpenAPI 3.1 document describing every registered handler."""
    components: dict[str, Any] = {
        "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
    }
    paths: dict[str, Any] = {}
    for spec in registry:
        if spec.response == "websocket":
            continue
        for method in spec.methods:
            paths.setdefault(spec.path, {})[method.lower()] = _operation(spec, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "omx", "version": omx.__version__,
                 "description": "Ollama-compatible distributed model runtime"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "peer": {"type": "apiKey", "in": "header", "name": "X-Omx-Signature"},
            },
        },
    }


def register(registry: FunctionRegistry) -> None:
    async def openapi(_body: None, _call: Call) -> dict[str, Any]:
        """The OpenAPI document of this node's API."""
        return openapi_document(registry)

    registry.handler("/openapi.json", methods=("GET",), auth="public", name="openapi", tags=("meta",))(openapi)
