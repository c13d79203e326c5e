"""Recognising tool calls in a model's reply.

Models announce tool calls as JSON objects (``{"name": ..., "arguments": ...}``),
alone, in a list, or wrapped in markers such as ``<tool_call>…</tool_call>``,
``[TOOL_CALLS]`` or a fenced code block. A reply counts as tool calls only when
everything in it, markers aside, is such objects.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["parse_tool_calls"]

_MARKERS = re.compile(r"</?tool_call>|\[TOOL_CALLS\]|<\|python_tag\|>|```(?:json)?", re.IGNORECASE)


def _as_call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if "function" in obj and isinstance(obj["function"], dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return {"function": {"name": name, "arguments": args}}


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls ``text`` consists of, or ``[]`` if it is ordinary prose."""
    body = _MARKERS.sub("\n", text).strip()
    if not body or body[0] not in "[{":
        return []
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    pos = 0
    while pos < len(body):
        while pos < len(body) and body[pos] in " \t\r\n,;":
            pos += 1
        if pos >= len(body):
            break
        try:
            value, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        items = value if isinstance(value, list) else [value]
        for item in items:
            call = _as_call(item)
            if call is None:
                return []
            calls.append(call)
    for index, call in enumerate(calls):
        call["function"]["index"] = index
    return calls
