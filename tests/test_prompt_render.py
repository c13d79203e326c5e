"""Prompt assembly: /api/generate values, truncation, Jinja fallback, Ollama funcs."""

from __future__ import annotations

import datetime as dt

import pytest

from omx.functions.prompt import (
    DEFAULT_TEMPLATE,
    Message,
    TemplateError,
    TemplateExecutionError,
    ToolCall,
    build_chat_prompt,
    parse_template,
    render_chat,
    render_generate,
    render_jinja_chat,
)

CHATML_LEGACY = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
    "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)


def test_generate_default_template_and_raw() -> None:
    assert render_generate(None, prompt="Why is the sky blue?") == "Why is the sky blue?"
    assert render_generate(DEFAULT_TEMPLATE, prompt="x", system="ignored by template") == "x"
    assert render_generate(CHATML_LEGACY, prompt="{{ raw }}", raw=True) == "{{ raw }}"


def test_generate_system_model_system_and_context() -> None:
    out = render_generate(CHATML_LEGACY, prompt="hi", model_system="model sys")
    assert out == (
        "<|im_start|>system\nmodel sys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    out = render_generate(CHATML_LEGACY, prompt="hi", system="req sys", model_system="model sys", context_text="PREV")
    assert out == "PREV<|im_start|>system\nreq sys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_system_default_only_when_first_message_is_not_system() -> None:
    tmpl = "{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    assert render_chat(tmpl, [Message("user", "u")], system_default="S") == "system:S;user:u;"
    assert render_chat(tmpl, [Message("system", "mine"), Message("user", "u")], system_default="S") == (
        "system:mine;user:u;"
    )


def test_chat_truncation_keeps_system_and_last_message() -> None:
    tmpl = "{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    msgs = [Message("system", "S"), Message("user", "a" * 50), Message("assistant", "b" * 50), Message("user", "q")]
    result = build_chat_prompt(tmpl, msgs, num_ctx=80, count_tokens=len)
    assert result.prompt == f"system:S;assistant:{'b' * 50};user:q;"
    assert result.first_message == 2
    full = build_chat_prompt(tmpl, msgs, num_ctx=1000, count_tokens=len)
    assert full.first_message == 0 and full.prompt.startswith("system:S;user:a")


QWEN25 = (
    "{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>\n"
    "{{- else if .Messages }}\n{{- if or .System .Tools }}<|im_start|>system\n{{- if .System }}\n{{ .System }}\n"
    "{{- end }}\n{{- if .Tools }}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{{- range .Tools }}\n"
    '{"type": "function", "function": {{ .Function }}}\n{{- end }}\n</tools>\n\nFor each function call, return a '
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n{{- end }}<|im_end|>\n{{ end }}\n'
    "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ else if eq .Role "assistant" }}'
    "<|im_start|>assistant\n{{ if .Content }}{{ .Content }}\n{{- else if .ToolCalls }}<tool_call>\n"
    '{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}\n'
    "{{ end }}</tool_call>\n{{- end }}{{ if not $last }}<|im_end|>\n{{ end }}\n"
    '{{- else if eq .Role "tool" }}<|im_start|>user\n<tool_response>\n{{ .Content }}\n</tool_response><|im_end|>\n'
    '{{ end }}\n{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n{{ end }}\n{{- end }}\n'
    "{{- else }}\n{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
    "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ end }}{{ .Response }}"
    "{{ if .Response }}<|im_end|>{{ end }}"
)
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add a & b",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    },
}


def test_qwen25_tools_and_fim() -> None:
    msgs = [
        Message("user", "1+2?"),
        Message("assistant", tool_calls=(ToolCall("add", {"b": 2, "a": 1}),)),
        Message("tool", "3"),
    ]
    assert render_chat(QWEN25, msgs, tools=[ADD_TOOL]) == (
        "<|im_start|>system\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name":"add","description":"Add a \\u0026 b","parameters":'
        '{"type":"object","required":["a"],"properties":{"a":{"type":"integer"}}}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call>"
        '</tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "add", "arguments": {"a":1,"b":2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_generate(QWEN25, prompt="def f(", suffix="return 1") == (
        "<|fim_prefix|>def f(<|fim_suffix|>return 1<|fim_middle|>"
    )
    assert render_generate(QWEN25, prompt="hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_current_date_function() -> None:
    tmpl = "Today: {{ currentDate }} / {{ yesterdayDate }}{{ range .Messages }} {{ .Content }}{{ end }}"
    assert render_chat(tmpl, [Message("user", "x")], today=dt.date(2024, 3, 1)) == "Today: 2024-03-01 / 2024-02-29 x"


def test_json_function_on_messages_and_tools() -> None:
    tmpl = (
        "{{ json .Tools }}|{{ range .Messages }}{{ range .ToolCalls }}"
        "{{ json .Function.Arguments }}{{ end }}{{ end }}"
    )
    msgs = [Message("assistant", tool_calls=(ToolCall("add", {"x": "<b>"}),))]
    assert render_chat(tmpl, msgs) == '[]|{"x":"\\u003cb\\u003e"}'


GEMMA_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
    "| trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_jinja_chat_template() -> None:
    msgs = [Message("user", "Hi "), Message("assistant", "Hello"), Message("user", "Bye")]
    assert render_jinja_chat(GEMMA_JINJA, msgs, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_jinja_helpers_and_errors() -> None:
    tmpl = (
        "{{ strftime_now('%Y-%m-%d') }} {{ tools | tojson }}"
        "{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "é"}}]
    now = dt.datetime(2025, 1, 2)
    assert render_jinja_chat(tmpl, [Message("user", "x")], tools=tools, now=now) == (
        '2025-01-02 [{"type": "function", "function": {"name": "é"}}]'
    )
    with pytest.raises(TemplateExecutionError, match="one only"):
        render_jinja_chat(tmpl, [Message("user", "x"), Message("user", "y")], now=now)
    with pytest.raises(TemplateExecutionError):
        render_jinja_chat("{{ ''.__class__.__mro__ }}", [Message("user", "x")])


def test_parsed_templates_are_kept_and_bad_ones_fail_every_time() -> None:
    source = "{{ .System }} {{ .Prompt }}"
    assert parse_template(source) is parse_template(source)  # parsed once, shared (it is immutable)
    huge = source + " " * (64 * 1024)
    assert parse_template(huge) is not parse_template(huge)  # too large to keep
    for _ in range(2):
        with pytest.raises(TemplateError):
            parse_template("{{ .Prompt ")
