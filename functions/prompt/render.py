"""Ollama's prompt construction over a model's Go TEMPLATE.

Mirrors ``template/template.go`` (Parse, Vars, Execute, collate, the legacy
System/Prompt/Response path) and the request-side assembly of
``server/routes.go`` (GenerateHandler) and ``server/prompt.go`` (chatPrompt,
including its context-window truncation). Images are not rendered: omx's
runner loads no vision projector, so requests carrying images are refused
before a prompt is built.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import gotemplate
from .gotemplate import nodes as n
from .goviews import ArgumentsMap, MessageView, ToolCallFunctionView, ToolCallView, ToolsView, tool_view
from .ollama_funcs import OLLAMA_ARITY, ollama_funcs

__all__ = [
    "DEFAULT_TEMPLATE",
    "ChatPrompt",
    "Message",
    "OllamaTemplate",
    "ToolCall",
    "Values",
    "build_chat_prompt",
    "execute",
    "parse_template",
    "render_chat",
    "render_generate",
    "template_uses",
]

DEFAULT_TEMPLATE = "{{ .Prompt }}"
"""Ollama's template for a model that has none."""

@dataclass(frozen=True)
class ToolCall:
    """A tool call made by the assistant; ``arguments`` is the decoded JSON object."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""
    index: int = 0


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str = ""
    thinking: str = ""
    tool_call_id: str = ""


@dataclass(frozen=True)
class Values:
    """What ``Template.Execute`` receives (Ollama's ``template.Values``)."""

    messages: Sequence[Message] = ()
    tools: Sequence[Mapping[str, Any]] | None = None
    prompt: str = ""
    suffix: str = ""
    think: bool = False
    think_level: str = ""
    is_think_set: bool = False


@dataclass(frozen=True)
class OllamaTemplate:
    """A parsed TEMPLATE with Ollama's touch-up applied and its identifiers known."""

    template: gotemplate.Template
    vars: frozenset[str]

    @property
    def source(self) -> str:
        return self.template.source


def _identifiers(node: n.Node) -> list[str]:
    # Ollama's Identifiers(): field and variable names, walking branches and pipes
    # (chain nodes are not walked, as in Ollama).
    if isinstance(node, n.ListNode):
        return [i for child in node.nodes for i in _identifiers(child)]
    if isinstance(node, n.ActionNode):
        return _identifiers(node.pipe)
    if isinstance(node, n.BranchNode):
        names = _identifiers(node.pipe) + _identifiers(node.list)
        return names + (_identifiers(node.else_list) if node.else_list is not None else [])
    if isinstance(node, n.PipeNode):
        return [i for cmd in node.cmds for arg in cmd.args for i in _identifiers(arg)]
    if isinstance(node, (n.FieldNode, n.VariableNode)):
        return list(node.ident)
    return []


_RESPONSE_ACTION = n.ActionNode(
    0, n.PipeNode(0, False, (), (n.CommandNode(0, (n.FieldNode(0, ("Response",)),)),))
)


def parse_template(source: str) -> OllamaTemplate:
    """Parse a model TEMPLATE as Ollama does (``{{ .Response }}`` appended when unused).

    Raises :class:`~omx.functions.prompt.gotemplate.TemplateError` (400) when invalid. Parsed templates are
    immutable, so the last 128 up to 64 KiB are kept: every request renders its model's template, and parsing
    it took ~8% of a request's CPU.
    """
    return _parse_cached(source) if len(source) <= _CACHED_TEMPLATE_MAX else _parse(source)


_CACHED_TEMPLATE_MAX = 64 * 1024


@functools.lru_cache(maxsize=128)
def _parse_cached(source: str) -> OllamaTemplate:
    return _parse(source)


def _parse(source: str) -> OllamaTemplate:
    tmpl = gotemplate.parse(source, ollama_funcs(), OLLAMA_ARITY)
    names = frozenset(i.lower() for i in _identifiers(tmpl.root))
    if "messages" not in names and "response" not in names:
        root = n.ListNode(tmpl.root.pos, tmpl.root.nodes + (_RESPONSE_ACTION,))
        tmpl = tmpl.with_root(root)
        names = names | {"response"}
    return OllamaTemplate(tmpl, names)


def template_uses(template: str | OllamaTemplate, name: str) -> bool:
    """Whether the template refers to ``.Name`` (case-insensitive), e.g. "tools", "suffix"."""
    tmpl = parse_template(template) if isinstance(template, str) else template
    return name.lower() in tmpl.vars


# --- Execute ---------------------------------------------------------------------------


def _collate(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """Merge consecutive same-role messages (never tool ones); gather system texts."""
    system: list[str] = []
    collated: list[Message] = []
    for m in messages:
        if m.role == "system":
            system.append(m.content)
        if collated and collated[-1].role == m.role and m.role != "tool":
            collated[-1] = replace(collated[-1], content=collated[-1].content + "\n\n" + m.content)
        else:
            collated.append(m)
    return "\n\n".join(system), collated


def _message_view(m: Message) -> MessageView:
    calls = tuple(
        ToolCallView(tc.id, ToolCallFunctionView(tc.index, tc.name, ArgumentsMap(tc.arguments)))
        for tc in m.tool_calls
    )
    return MessageView(m.role, m.content, m.thinking, (), calls, m.tool_name, m.tool_call_id)


def _cut_after_response(node: n.Node, state: list[bool]) -> n.Node | None:
    # Ollama's deleteNode: keep everything up to the first .Response field, drop the rest.
    if state[0]:
        return None
    if isinstance(node, n.FieldNode) and "Response" in node.ident:
        state[0] = True
        return node
    if isinstance(node, n.ListNode):
        kept = [k for k in (_cut_after_response(c, state) for c in node.nodes) if k is not None]
        return n.ListNode(node.pos, tuple(kept))
    if isinstance(node, n.BranchNode):
        body = _cut_after_response(node.list, state)
        other = _cut_after_response(node.else_list, state) if node.else_list is not None else None
        return replace(node, list=body if isinstance(body, n.ListNode) else n.ListNode(node.pos, ()),
                       else_list=other if isinstance(other, n.ListNode) else None)  # fmt: skip
    if isinstance(node, n.ActionNode):
        pipe = _cut_after_response(node.pipe, state)
        return replace(node, pipe=pipe) if isinstance(pipe, n.PipeNode) else None
    if isinstance(node, n.PipeNode):
        cmds = []
        for cmd in node.cmds:
            args = tuple(a for a in (_cut_after_response(x, state) for x in cmd.args) if a is not None)
            if not args:
                return None
            cmds.append(replace(cmd, args=args))
        return replace(node, cmds=tuple(cmds)) if cmds else None
    return node


def _date_funcs(today: _dt.date | None) -> dict[str, Callable[..., Any]] | None:
    if today is None:
        return None
    return ollama_funcs(today=lambda: today)


def execute(template: OllamaTemplate, values: Values, *, today: _dt.date | None = None) -> str:
    """Ollama's ``Template.Execute``: the suffix, messages or legacy path, chosen as Ollama does."""
    funcs = _date_funcs(today)
    tmpl = template.template
    system, messages = _collate(values.messages)
    think = {"Think": values.think, "ThinkLevel": values.think_level, "IsThinkSet": values.is_think_set}
    if values.prompt and values.suffix:
        data = {"Prompt": values.prompt, "Suffix": values.suffix, "Response": "", **think}
        return tmpl.execute(data, funcs=funcs)
    if "messages" in template.vars:
        tools = ToolsView(tool_view(t) for t in values.tools or ())
        data = {
            "System": system,
            "Messages": [_message_view(m) for m in messages],
            "Tools": tools,
            "Response": "",
            **think,
        }
        return tmpl.execute(data, funcs=funcs)
    # Legacy templates: render each (system, prompt, response) turn, then the last turn
    # with everything after {{ .Response }} cut, so the model continues from there.
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        out.append(tmpl.execute({**turn, **think}, funcs=funcs))
        turn.update(System="", Prompt="", Response="")

    for m in messages:
        if m.role == "system":
            if turn["Prompt"] or turn["Response"]:
                flush()
            turn["System"] = m.content
        elif m.role == "user":
            if turn["Response"]:
                flush()
            turn["Prompt"] = m.content
        elif m.role == "assistant":
            turn["Response"] = m.content
    root = _cut_after_response(tmpl.root, [False])
    cut = tmpl.with_root(root if isinstance(root, n.ListNode) else n.ListNode(0, ()))
    out.append(cut.execute({**turn, **think}, funcs=funcs))
    return "".join(out)


# --- request assembly ---------------------------------------------------------------------


def _as_template(template: str | OllamaTemplate | None) -> OllamaTemplate:
    if isinstance(template, OllamaTemplate):
        return template
    return parse_template(template or DEFAULT_TEMPLATE)


def render_generate(
    template: str | OllamaTemplate | None,
    *,
    prompt: str,
    system: str | None = None,
    suffix: str | None = None,
    model_system: str | None = None,
    model_messages: Sequence[Message] = (),
    context_text: str | None = None,
    raw: bool = False,
    think: bool | None = None,
    think_level: str = "",
    today: _dt.date | None = None,
) -> str:
    """The prompt ``/api/generate`` sends to the model, built as Ollama's GenerateHandler does.

    ``system`` is the request's, ``model_system``/``model_messages`` the model's SYSTEM and
    MESSAGE lines; ``context_text`` is the detokenized ``context`` of a previous call, put
    first (model messages are then skipped).
    With ``raw`` the prompt goes through untouched.
    """
    if raw:
        return prompt
    tmpl = _as_template(template)
    if suffix:
        values = Values(prompt=prompt, suffix=suffix)
    else:
        msgs: list[Message] = []
        if system:
            msgs.append(Message("system", system))
        elif model_system:
            msgs.append(Message("system", model_system))
        if context_text is None:
            msgs.extend(model_messages)
        msgs.append(Message("user", prompt))
        values = Values(messages=msgs)
    values = replace(values, think=bool(think), think_level=think_level, is_think_set=think is not None)
    return (context_text or "") + execute(tmpl, values, today=today)


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt: the text and the first message kept."""

    prompt: str
    first_message: int


def build_chat_prompt(
    template: str | OllamaTemplate | None,
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    system_default: str | None = None,
    model_messages: Sequence[Message] = (),
    think: bool | None = None,
    think_level: str = "",
    num_ctx: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    today: _dt.date | None = None,
) -> ChatPrompt:
    """Ollama's ChatHandler + chatPrompt: default system, truncation, rendering.

    When ``num_ctx`` and ``count_tokens`` are given, the oldest messages are dropped
    until the prompt fits (system messages and the last message always stay).
    """
    tmpl = _as_template(template)
    msgs = list(model_messages) + list(messages)
    if system_default and (not messages or messages[0].role != "system"):
        msgs.insert(0, Message("system", system_default))
    values = Values(think=bool(think), think_level=think_level, is_think_set=think is not None)

    def render(selected: list[Message]) -> str:
        return execute(tmpl, replace(values, messages=selected, tools=tools), today=today)

    last = len(msgs) - 1
    start = last
    system: list[Message] = []
    for i in range(last - 1, -1, -1):
        system = [m for m in msgs[:i] if m.role == "system"]
        if num_ctx is None or count_tokens is None:
            start = i
            continue
        if count_tokens(render(system + msgs[i:])) > num_ctx:
            break
        start = i
    start = max(start, 0)
    return ChatPrompt(render(system + msgs[start:]), start)


def render_chat(
    template: str | OllamaTemplate | None,
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    system_default: str | None = None,
    think: bool | None = None,
    today: _dt.date | None = None,
) -> str:
    """The prompt ``/api/chat`` sends to the model (no truncation); see :func:`build_chat_prompt`."""
    return build_chat_prompt(
        template, messages, tools=tools, system_default=system_default, think=think, today=today
    ).prompt
