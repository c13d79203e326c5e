"""Turning requests into prompt text with the model's template.

A model's TEMPLATE (Go template syntax, as Ollama's) wins; without one, the
GGUF's own chat template (Jinja) is used; without either, the prompt is used
as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from omx.errors import InvalidRequest
from omx.functions.prompt import (
    Message,
    TemplateError,
    ToolCall,
    build_chat_prompt,
    render_chat,
    render_generate,
    render_jinja_chat,
)
from omx.functions.schemas import ChatMessage
from omx.protocols import Runner
from omx.storage import ResolvedModel

__all__ = ["chat_prompt", "fit_chat_prompt", "generate_prompt"]



def _to_message(m: ChatMessage | Mapping[str, Any]) -> Message:
    if not isinstance(m, ChatMessage):
        m = ChatMessage.model_validate(m)
    calls = tuple(
        ToolCall(name=c.function.name, arguments=c.function.arguments) for c in (m.tool_calls or ())
    )
    return Message(role=m.role, content=m.content, tool_calls=calls,
                   tool_name=m.tool_name or "", thinking=m.thinking or "")


def _model_messages(model: ResolvedModel) -> list[Message]:
    return [_to_message(m) for m in (model.messages)]


def generate_prompt(model: ResolvedModel, *, prompt: str, system: str | None, suffix: str | None,
                    template: str | None) -> str:
    """The prompt ``/api/generate`` sends to the model."""
    tmpl = template if template is not None else model.template
    model_system = model.system
    sys_text = system if system is not None else model_system
    try:
        if tmpl:
            return render_generate(tmpl, prompt=prompt, system=system, suffix=suffix,
                                   model_system=model_system, model_messages=_model_messages(model))
        chat_template = (model.gguf.chat_template if model.gguf else None)
        if chat_template:
            msgs = _model_messages(model)
            if sys_text:
                msgs.insert(0, Message(role="system", content=sys_text))
            msgs.append(Message(role="user", content=prompt))
            return _jinja(model, chat_template, msgs, None)
    except TemplateError as exc:
        raise InvalidRequest(f"template error: {exc}") from exc
    return prompt


def _jinja(model: ResolvedModel, chat_template: str, msgs: Sequence[Message], tools: Any) -> str:
    info = model.gguf
    return render_jinja_chat(chat_template, msgs, tools=tools,
                             bos_token=(info.bos_token if info else "") or "",
                             eos_token=(info.eos_token if info else "") or "")


def chat_prompt(model: ResolvedModel, messages: Sequence[ChatMessage], *,
                tools: Sequence[dict[str, Any]] | None) -> str:
    """The prompt ``/api/chat`` sends to the model for ``messages``."""
    msgs = _model_messages(model) + [_to_message(m) for m in messages]
    tmpl = model.template
    try:
        if tmpl:
            return render_chat(tmpl, msgs, tools=tools, system_default=model.system)
        chat_template = (model.gguf.chat_template if model.gguf else None)
        if chat_template:
            system = model.system
            if system and not any(m.role == "system" for m in msgs):
                msgs.insert(0, Message(role="system", content=system))
            return _jinja(model, chat_template, msgs, tools)
    except TemplateError as exc:
        raise InvalidRequest(f"template error: {exc}") from exc
    return render_chat("{{ .Prompt }}", msgs, tools=tools, system_default=model.system)


async def fit_chat_prompt(model: ResolvedModel, messages: Sequence[ChatMessage], *,
                          tools: Sequence[dict[str, Any]] | None,
                          num_ctx: int, runner: Runner) -> str:
    """The chat prompt, with the oldest messages dropped until it fits ``num_ctx`` tokens.

    System messages and the last message always stay, as in Ollama. A prompt of
    fewer bytes than the context holds fits without being tokenized (a token is
    never shorter than one byte), which keeps the common path free of work.
    """
    prompt = chat_prompt(model, messages, tools=tools)
    tmpl = model.template
    if len(prompt.encode()) + 2 <= num_ctx or not tmpl:
        return prompt
    if len(await runner.tokenize(prompt)) <= num_ctx:
        return prompt
    loop = asyncio.get_running_loop()

    def count(text: str) -> int:
        return len(asyncio.run_coroutine_threadsafe(runner.tokenize(text), loop).result(60))

    msgs = [_to_message(m) for m in messages]
    try:
        fitted = await asyncio.to_thread(
            build_chat_prompt, tmpl, msgs, tools=tools, system_default=model.system,
            model_messages=_model_messages(model), num_ctx=num_ctx, count_tokens=count)
    except TemplateError as exc:
        raise InvalidRequest(f"template error: {exc}") from exc
    return fitted.prompt
