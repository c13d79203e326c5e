"""The functions Ollama adds to every template: json, currentDate, yesterdayDate, toTypeScriptType."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from typing import Any

from .gotemplate import go_json
from .goviews import PropertyType, ToolPropertyView

__all__ = ["OLLAMA_ARITY", "ollama_funcs", "typescript_type"]

OLLAMA_ARITY: dict[str, tuple[int, int | None]] = {
    "json": (1, 1),
    "currentDate": (0, None),
    "yesterdayDate": (0, None),
    "toTypeScriptType": (1, 1),
}

_TS_SCALARS = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean", "null": "null"}


def _ts_of(kind: str, prop: ToolPropertyView) -> str:
    if kind == "array":
        items = prop.Items
        if isinstance(items, dict) and isinstance(items.get("type"), str):
            return _TS_SCALARS.get(items["type"], "any") + "[]"
        return "any[]"
    if kind == "object":
        return "object"
    return _TS_SCALARS.get(kind, "any")


def typescript_type(value: object) -> str:
    """A TypeScript type for a tool property: enums as string unions, arrays as ``T[]``."""
    if not isinstance(value, ToolPropertyView):
        return "any"
    if value.AnyOf:
        return " | ".join(typescript_type(p) for p in value.AnyOf)
    if value.Enum:
        return " | ".join(go_json(e) for e in value.Enum)
    types: PropertyType = value.Type
    if not types:
        return "any"
    return " | ".join(_ts_of(t, value) for t in types)


def ollama_funcs(today: Callable[[], _dt.date] | None = None) -> dict[str, Callable[..., Any]]:
    """Ollama's template functions; ``today`` supplies the date (default: the local date)."""
    clock = today or _dt.date.today

    def current_date(*_format: object) -> str:
        # Ollama accepts and ignores a format argument; the date is YYYY-MM-DD.
        return clock().isoformat()

    def yesterday_date(*_format: object) -> str:
        return (clock() - _dt.timedelta(days=1)).isoformat()

    return {
        "json": go_json,
        "currentDate": current_date,
        "yesterdayDate": yesterday_date,
        "toTypeScriptType": typescript_type,
    }
