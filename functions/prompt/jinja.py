"""Rendering a GGUF ``tokenizer.chat_template`` (Hugging Face Jinja) when a model has no TEMPLATE.

Uses jinja2's ImmutableSandboxedEnvironment with the globals and filters that
Hugging Face's ``apply_chat_template`` provides: ``raise_exception``,
``strftime_now``, and a ``tojson`` that keeps non-ASCII text and key order.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .gotemplate import TemplateError, TemplateExecutionError
from .render import Message

__all__ = ["compile_jinja", "jinja_messages", "render_jinja_chat"]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_jinja(chat_template: str) -> jinja2.Template:
    """Compile a chat template in the sandbox; raises :class:`TemplateError` (400) when invalid."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"invalid chat template: {exc.message}", line=exc.lineno or 0) from None


def jinja_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages in the OpenAI/HF shape chat templates expect."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.thinking:
            item["reasoning_content"] = m.thinking
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    **({"id": tc.id} if tc.id else {}),
                    "type": "function",
                    "function": {"name": tc.name, "arguments": dict(tc.arguments)},
                }
                for tc in m.tool_calls
            ]
        if m.role == "tool":
            if m.tool_name:
                item["name"] = m.tool_name
            if m.tool_call_id:
                item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def render_jinja_chat(
    chat_template: str,
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    now: _dt.datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Render ``chat_template`` like ``apply_chat_template(..., tokenize=False)``.

    ``now`` fixes ``strftime_now`` (default: the local time); ``extra`` adds variables
    (e.g. ``enable_thinking``). A template that raises renders a 500
    :class:`TemplateExecutionError`.
    """
    template = compile_jinja(chat_template)
    moment = now

    def strftime_now(fmt: str) -> str:
        return (moment or _dt.datetime.now()).strftime(fmt)

    context: dict[str, Any] = {
        "messages": jinja_messages(messages),
        "tools": [dict(t) for t in tools] if tools else None,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_generation_prompt": add_generation_prompt,
        "strftime_now": strftime_now,
        **(extra or {}),
    }
    try:
        return template.render(**context)
    except Exception as exc:  # the template is model-supplied code: any failure is a render error
        raise TemplateExecutionError(f"chat template: {exc}") from None
