"""Prompt rendering: Ollama's Go TEMPLATE engine and prompt assembly, plus HF Jinja chat templates.

Choose the renderer as Ollama does: the model's TEMPLATE when it has one, else its
GGUF ``tokenizer.chat_template`` through :func:`render_jinja_chat`, else
:data:`DEFAULT_TEMPLATE` (``{{ .Prompt }}``).
"""

from __future__ import annotations

from .gotemplate import TemplateError, TemplateExecutionError
from .jinja import compile_jinja, render_jinja_chat
from .render import (
    DEFAULT_TEMPLATE,
    ChatPrompt,
    Message,
    OllamaTemplate,
    ToolCall,
    Values,
    build_chat_prompt,
    execute,
    parse_template,
    render_chat,
    render_generate,
    template_uses,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "ChatPrompt",
    "Message",
    "OllamaTemplate",
    "TemplateError",
    "TemplateExecutionError",
    "ToolCall",
    "Values",
    "build_chat_prompt",
    "compile_jinja",
    "execute",
    "parse_template",
    "render_chat",
    "render_generate",
    "render_jinja_chat",
    "template_uses",
]
