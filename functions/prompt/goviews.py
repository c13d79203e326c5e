"""What Ollama's templates see: its message and tool structs, with Go field names.

Field names, JSON keys, ``omitempty`` rules and ``String()`` methods follow
Ollama's ``template.go`` (templateMessage, templateTool…) and ``api/types.go``:
tools, tool functions, call arguments and properties print as compact JSON
(``{{ .Function.Arguments }}``, ``{{ $.Tools }}``), messages print as Go structs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .gotemplate import JsonObject, go_json

__all__ = [
    "ArgumentsMap",
    "MessageView",
    "PropertiesMap",
    "PropertyType",
    "ToolCallFunctionView",
    "ToolCallView",
    "ToolFunctionView",
    "ToolParametersView",
    "ToolPropertyView",
    "ToolView",
    "ToolsView",
    "tool_view",
]


class _JsonString:
    """Mixin: ``String()`` is the JSON encoding (Ollama's Stringer types)."""

    def go_string(self) -> str:
        return go_json(self)


class ArgumentsMap(dict[str, Any], _JsonString):
    """``templateArgs``: a tool call's arguments; prints as JSON (``{}`` when empty)."""


class PropertiesMap(dict[str, "ToolPropertyView"], _JsonString):
    """``templateProperties``: parameter name to property; prints as JSON."""


class PropertyType(tuple[str, ...]):
    """``api.PropertyType``: one JSON-schema type, or several."""

    def go_json(self) -> object:
        return self[0] if len(self) == 1 else list(self)

    def go_string(self) -> str:
        if len(self) == 1:
            return self[0]
        return "[" + " ".join(self) + "]"


def _omit_empty(pairs: Sequence[tuple[str, Any, bool]]) -> JsonObject:
    """Keep (key, value) unless flagged omitempty and the value is Go-empty."""
    kept = []
    for key, value, omitempty in pairs:
        if omitempty and (value is None or value == "" or (isinstance(value, (list, tuple, dict)) and not value)):
            continue
        kept.append((key, value))
    return JsonObject(kept)


@dataclass(frozen=True)
class ToolPropertyView(_JsonString):
    AnyOf: tuple[ToolPropertyView, ...] = ()
    Type: PropertyType = PropertyType()
    Items: Any = None
    Description: str = ""
    Enum: tuple[Any, ...] = ()
    Properties: PropertiesMap | None = None

    def go_json(self) -> object:
        return _omit_empty(
            [
                ("anyOf", list(self.AnyOf), True),
                ("type", self.Type, True),
                ("items", self.Items, True),
                ("description", self.Description, True),
                ("enum", list(self.Enum), True),
                ("properties", self.Properties, True),
            ]
        )


@dataclass(frozen=True)
class ToolParametersView(_JsonString):
    Type: str = ""
    Defs: Any = None
    Items: Any = None
    Required: tuple[str, ...] = ()
    Properties: PropertiesMap | None = None

    def go_json(self) -> object:
        return _omit_empty(
            [
                ("type", self.Type, False),
                ("$defs", self.Defs, True),
                ("items", self.Items, True),
                ("required", list(self.Required), True),
                ("properties", self.Properties, False),
            ]
        )


@dataclass(frozen=True)
class ToolFunctionView(_JsonString):
    Name: str = ""
    Description: str = ""
    Parameters: ToolParametersView = field(default_factory=ToolParametersView)

    def go_json(self) -> object:
        return JsonObject([("name", self.Name), ("description", self.Description), ("parameters", self.Parameters)])


@dataclass(frozen=True)
class ToolView(_JsonString):
    Type: str = ""
    Items: Any = None
    Function: ToolFunctionView = field(default_factory=ToolFunctionView)

    def go_json(self) -> object:
        return _omit_empty(
            [("type", self.Type, False), ("items", self.Items, True), ("function", self.Function, False)]
        )


class ToolsView(tuple[ToolView, ...], _JsonString):
    """``templateTools``: the request's tools; prints as a JSON array."""


@dataclass(frozen=True)
class ToolCallFunctionView:
    Index: int = 0
    Name: str = ""
    Arguments: ArgumentsMap = field(default_factory=ArgumentsMap)


@dataclass(frozen=True)
class ToolCallView:
    ID: str = ""
    Function: ToolCallFunctionView = field(default_factory=ToolCallFunctionView)


@dataclass(frozen=True)
class MessageView:
    Role: str = ""
    Content: str = ""
    Thinking: str = ""
    Images: tuple[Any, ...] = ()
    ToolCalls: tuple[ToolCallView, ...] = ()
    ToolName: str = ""
    ToolCallID: str = ""


# --- from API JSON (what /api/chat receives) -------------------------------------------


def _property(raw: Any) -> ToolPropertyView:
    if not isinstance(raw, Mapping):
        return ToolPropertyView()
    kind = raw.get("type")
    types = PropertyType([kind] if isinstance(kind, str) else [str(t) for t in kind or ()])
    nested = raw.get("properties")
    return ToolPropertyView(
        AnyOf=tuple(_property(p) for p in raw.get("anyOf") or ()),
        Type=types,
        Items=raw.get("items"),
        Description=str(raw.get("description") or ""),
        Enum=tuple(raw.get("enum") or ()),
        Properties=_properties(nested) if isinstance(nested, Mapping) else None,
    )


def _properties(raw: Mapping[str, Any]) -> PropertiesMap:
    return PropertiesMap({str(k): _property(v) for k, v in raw.items()})


def tool_view(raw: Mapping[str, Any]) -> ToolView:
    """Ollama's decoding of one request tool (unknown keys dropped, as Go's decoder does)."""
    fn = raw.get("function") or {}
    params = fn.get("parameters") or {}
    props = params.get("properties")
    return ToolView(
        Type=str(raw.get("type") or ""),
        Items=raw.get("items"),
        Function=ToolFunctionView(
            Name=str(fn.get("name") or ""),
            Description=str(fn.get("description") or ""),
            Parameters=ToolParametersView(
                Type=str(params.get("type") or ""),
                Defs=params.get("$defs"),
                Items=params.get("items"),
                Required=tuple(str(r) for r in params.get("required") or ()),
                Properties=_properties(props) if isinstance(props, Mapping) else None,
            ),
        ),
    )
