"""``GET /openapi.json``: the OpenAPI 3.1 document generated from the registry.

Request bodies are the handlers' own pydantic models, so the types, enums,
bounds and required fields the edge enforces are the ones documented. What a
model's annotations cannot say is added here, from the same rules the
handlers apply: model names follow Ollama's naming rules (a pattern), digests
are ``sha256:<hex>``, a body that names its model as ``model`` or ``name``
needs one of them, and a field sent as ``null`` counts as unset wherever the
body model drops nulls (as Ollama's Go decoding does). Path templates carry
no routing converters (``{model}``, not ``{model:path}``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

import omx
from omx.functions.call import Call
from omx.functions.inference import MAX_THREADS
from omx.functions.options import _BOOL, _FLOAT, _INT, _LIST
from omx.functions.registry import FunctionRegistry, HandlerSpec

__all__ = ["DIGEST_PATTERN", "MODEL_NAME_PATTERN", "openapi_document", "register"]

_MEDIA = {"json": "application/json", "ndjson": "application/x-ndjson", "sse": "text/event-stream",
          "text": "text/plain", "raw": "application/octet-stream", "file": "application/octet-stream",
          "websocket": "application/json"}
_OWN_MEDIA = {"cluster_ca": "application/x-pem-file"}
"""Handlers that set their answer's media type themselves."""
_EMPTY_OK = frozenset({"copy", "delete", "blob_upload"})
"""Handlers whose success has no body (as Ollama's)."""

_PART = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,39}(?:\.[A-Za-z0-9_-]{1,19}){0,2}"
_NAMESPACE = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"
_HOST = r"[A-Za-z0-9_](?:\.?[A-Za-z0-9_:-]){0,99}"
MODEL_NAME_PATTERN = rf"^(?:(?:{_HOST}/)?{_NAMESPACE}/)?{_PART}(?::{_PART})?$"
"""``[host/][namespace/]model[:tag]`` as Ollama spells names (each part starts with a letter,
digit or ``_``; a model or tag part has at most two dots, never two in a row, and 80
characters). Every name it matches is accepted; some long or many-dotted names that the
store accepts too fall outside it."""
DIGEST_PATTERN = r"^sha256[:-][0-9a-f]{64}$"

_MODEL_NAME: dict[str, Any] = {"type": "string", "pattern": MODEL_NAME_PATTERN,
                               "description": "A model name: [host/][namespace/]model[:tag]."}
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "digest": {"type": "string", "pattern": DIGEST_PATTERN},
    "model": _MODEL_NAME,
    "name": _MODEL_NAME,
}
_DURATION = r"^(?:-?[0-9]+(?:\.[0-9]+)?|(?:-?[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+)?$"
_KEEP_ALIVE: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"type": "string", "pattern": _DURATION}],
    "description": "Seconds, or a duration such as 5m or 1h30m; 0 unloads at once, a negative value keeps "
                   "the model loaded; empty or null: the node's engine.keep_alive."}
_IMAGES_REFUSED = ("Refused with 400 when not empty: this node loads no vision projector, so it cannot "
                   "read images.")


def _options_schema() -> dict[str, Any]:
    """Ollama's runtime options as the handlers check them (unknown keys and nulls are ignored)."""
    props: dict[str, Any] = {}
    bounds = {"num_ctx": (1, 2**31 - 1), "num_batch": (1, 2**31 - 1), "num_thread": (0, MAX_THREADS)}
    for key in sorted(_INT):
        low, high = bounds.get(key, (-(2**31), 2**31 - 1))
        props[key] = {"type": "integer", "minimum": low, "maximum": high}
    for key in sorted(_FLOAT):
        props[key] = {"type": "number"}
    for key in sorted(_BOOL):
        props[key] = {"type": "boolean"}
    for key in sorted(_LIST):
        props[key] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    return {"type": "object", "properties": {k: _or_null(v) for k, v in props.items()},
            "additionalProperties": True,
            "description": "Runtime options (Ollama's names and types); unknown keys are ignored."}


_CONVERTER = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*):[a-z]+}")
_NULL = {"type": "null"}


def _drops_nulls(cls: type[BaseModel]) -> bool:
    """Whether the body model treats a ``null`` field as unset (its ``_null_is_unset`` validator)."""
    return "_null_is_unset" in cls.__pydantic_decorators__.model_validators


def _or_null(prop: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {k: prop[k] for k in ("title", "description", "default") if k in prop}
    body = {k: v for k, v in prop.items() if k not in meta}
    if body == _NULL or _NULL in body.get("anyOf", ()):
        return prop
    if set(body) == {"anyOf"}:
        return {**meta, "anyOf": [*body["anyOf"], _NULL]}
    return {**meta, "anyOf": [body, _NULL]}


def _name_or_empty(prop: dict[str, Any]) -> dict[str, Any]:
    outer: dict[str, Any] = {k: prop[k] for k in ("title", "default") if k in prop}
    return {**outer, "anyOf": [_MODEL_NAME, {"type": "string", "maxLength": 0}]}


def _as_name(prop: dict[str, Any]) -> dict[str, Any]:
    """A string property (or the string branch of an optional one) as a model name."""
    if prop.get("type") == "string":
        return {**_MODEL_NAME, **{k: prop[k] for k in ("title", "default") if k in prop}}
    if "anyOf" in prop:
        return {**prop, "anyOf": [_as_name(p) for p in prop["anyOf"]]}
    return prop


class _BodySchema(GenerateJsonSchema):
    """Pydantic's JSON schema plus the handlers' rules that annotations do not carry."""

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        # JSON has no integer size; the engine and the stores take 64-bit ones.
        out = super().int_schema(schema)
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -(2**63)
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = 2**63 - 1
        return out

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        out = super().model_schema(schema)
        props = out.get("properties")
        if not isinstance(props, dict):
            return out
        cls = schema["cls"]
        if "model" in props and "name" in props:
            # Ollama's bodies name their model as ``model`` or, in older clients, ``name``.
            props["model"], props["name"] = _name_or_empty(props["model"]), _name_or_empty(props["name"])
            out["anyOf"] = [{"required": ["model"], "properties": {"model": _MODEL_NAME}},
                            {"required": ["name"], "properties": {"name": _MODEL_NAME}}]
        else:
            for key in ("model", "model_name"):
                if key in props:
                    props[key] = _as_name(props[key])
        if "options" in props:
            props["options"] = _options_schema()
        if "keep_alive" in props:
            props["keep_alive"] = {**_KEEP_ALIVE, "title": "Keep Alive"}
        if "images" in props:
            props["images"] = {**props["images"], "maxItems": 0, "description": _IMAGES_REFUSED}
        for key in ("source", "destination"):
            if key in props and set(props) == {"source", "destination"}:
                props[key] = _as_name(props[key])
        if _drops_nulls(cls):  # a null member is dropped first, so only optional ones may be null
            for key in set(props) - set(out.get("required", ())):
                props[key] = _or_null(props[key])
        return out


def _body_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True,
                                     schema_generator=_BodySchema)
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(spec: HandlerSpec, method: str, components: dict[str, Any]) -> dict[str, Any]:
    error = "OpenAIError" if "openai" in spec.tags else "Error"
    ok: dict[str, Any] = {"description": "OK"}
    if method != "HEAD" and spec.name not in _EMPTY_OK:
        ok["content"] = {_OWN_MEDIA.get(spec.name, _MEDIA[spec.response]): {}}
    failed: dict[str, Any] = {"description": "An error"}
    if method != "HEAD":  # a HEAD answer has no body, an error's neither
        failed["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}
    op: dict[str, Any] = {
        "operationId": spec.name if len(spec.methods) == 1 else f"{spec.name}_{method.lower()}",
        "summary": spec.summary or spec.name,
        "tags": list(spec.tags),
        "responses": {
            "200": ok,
            "default": failed,
        },
    }
    if spec.name == "blob_upload":
        op["responses"]["201"] = {"description": "Stored"}
    if spec.path_params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": _PATH_PARAMS.get(p, {"type": "string"})} for p in spec.path_params]
    if spec.request is not None and method not in ("GET", "HEAD"):
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": _body_schema(spec.request, components)}}}
    elif spec.body == "raw":
        op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
    if spec.auth in ("apikey", "admin"):
        op["security"] = [{}, {"bearer": []}]
    elif spec.auth == "peer":
        op["security"] = [{"peer": []}]
    return op


def openapi_document(registry: FunctionRegistry) -> dict[str, Any]:
    """An OpenAPI 3.1 document describing every registered handler but WebSocket ones."""
    components: dict[str, Any] = {
        "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
        "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}},
    }
    paths: dict[str, Any] = {}
    for spec in registry:
        if spec.response == "websocket":
            continue  # OpenAPI has no way to describe a WebSocket's messages
        path = _CONVERTER.sub(r"{\1}", spec.path)
        for method in spec.methods:
            paths.setdefault(path, {})[method.lower()] = _operation(spec, method, components)
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
