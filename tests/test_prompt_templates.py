"""Ollama's own model templates and expected outputs (template/testdata, server/testdata/tools)."""

from __future__ import annotations

import pytest

from omx.functions.prompt import Message, ToolCall, render_chat, render_generate, template_uses

LLAMA3 = (
    "{{- if .Messages }}\n{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n"
    "{{- end }}\n{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ else -}}\n"
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>\n{{- end -}}"
)
GEMMA3 = (
    "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq .Role "user" }}<start_of_turn>user\n{{- if and (eq $i 1) $.System }}\n{{ $.System }}\n{{ end }}\n'
    '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
    "{{ end }}\n{{- if $last }}<start_of_turn>model\n{{ end }}\n{{- end }}\n"
)
GEMMA = (
    '{{- if .Messages }}\n{{- range $index, $_ := .Messages }}<start_of_turn>\n{{- if eq .Role "user" }}user\n'
    '{{- if and $.System (eq $index 0) }}\n{{ $.System }}\n{{- end }}\n{{- else if eq .Role "assistant" }}model\n'
    "{{- end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n{{ else -}}\n<start_of_turn>user\n"
    "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n"
    "{{ .Response }}<end_of_turn>\n{{ end -}}"
)
MISTRAL = (
    '{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n{{- if eq .Role "user" }}[INST] '
    "{{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}\n{{ end }}{{ .Content }}\n"
    '{{- else if eq .Role "assistant" }}[/INST] {{ .Content }}</s>\n{{- end }}\n{{- end }}[/INST]\n'
    "{{- else -}}\n[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}[/INST] {{ .Response }}</s>\n{{- end -}}"
)
LLAMA2 = (
    '{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n{{- if eq .Role "user" }}[INST] '
    "{{ if eq $index 0 }}<<SYS>>\n{{- if $.System }}\n{{ $.System }}\n{{ end }}<</SYS>>\n\n{{ end }}{{ .Content }}\n"
    "{{- else }} [/INST] {{ .Content }}</s><s>\n{{- end }}\n{{- end }} [/INST]\n{{- else -}}\n"
    "[INST] <<SYS>>{{ if .System }}{{ .System }}{{ end }}<</SYS>>\n\n{{ .Prompt }} [/INST] {{ .Response }}</s>\n"
    "{{- end -}}"
)
CHATML = (
    "{{- if .Messages }}\n{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    "{{ else }}\n{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
    "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n{{- end }}"
)
PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"

SYSTEM = Message("system", "You are a helpful assistant.")
USER1 = Message("user", "Hello, how are you?")
ASSISTANT = Message("assistant", "I'm doing great. How can I help you today?")
USER2 = Message("user", "I'd like to show off how chat templating works!")
CASES = {
    "user": [USER1],
    "user-assistant-user": [USER1, ASSISTANT, USER2],
    "system-user-assistant-user": [SYSTEM, USER1, ASSISTANT, USER2],
}

# Ollama's template/testdata/<name>.gotmpl/<case> files, verbatim.
EXPECTED = [
    (LLAMA3, "user-assistant-user",
     "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    (GEMMA3, "system-user-assistant-user",
     "<start_of_turn>user\nYou are a helpful assistant.\n\nHello, how are you?<end_of_turn>\n"
     "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
     "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n<start_of_turn>model\n\n"),
    (GEMMA3, "user-assistant-user",
     "<start_of_turn>user\nHello, how are you?<end_of_turn>\n"
     "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
     "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n<start_of_turn>model\n\n"),
    (GEMMA3, "user", "<start_of_turn>user\nHello, how are you?<end_of_turn>\n<start_of_turn>model\n\n"),
    (GEMMA, "user-assistant-user",
     "<start_of_turn>user\nHello, how are you?<end_of_turn>\n"
     "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
     "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n<start_of_turn>model\n"),
    (MISTRAL, "user-assistant-user",
     "[INST] Hello, how are you?[/INST] I'm doing great. How can I help you today?</s>"
     "[INST] I'd like to show off how chat templating works![/INST]"),
    (MISTRAL, "system-user-assistant-user",
     "[INST] Hello, how are you?[/INST] I'm doing great. How can I help you today?</s>"
     "[INST] You are a helpful assistant.\nI'd like to show off how chat templating works![/INST]"),
    (CHATML, "user-assistant-user",
     "<|im_start|>user\nHello, how are you?<|im_end|>\n"
     "<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n"
     "<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n<|im_start|>assistant\n"),
    (PHI3, "system-user-assistant-user",
     "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHello, how are you?<|end|>\n"
     "<|assistant|>\nI'm doing great. How can I help you today?<|end|>\n"
     "<|user|>\nI'd like to show off how chat templating works!<|end|>\n<|assistant|>\n"),
]  # fmt: skip


@pytest.mark.parametrize(("template", "case", "expected"), EXPECTED)
def test_ollama_testdata(template: str, case: str, expected: str) -> None:
    assert render_chat(template, CASES[case]) == expected


# --- template_test.go: TestExecuteWithMessages (legacy and messages templates agree) -----------

MISTRAL_LEGACY = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
MISTRAL_LEGACY_RESPONSE = MISTRAL_LEGACY + "{{ .Response }}"
MISTRAL_MESSAGES = (
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}\n'
    "{{- end }}"
)
HELLO = [Message("user", "Hello friend!"), Message("assistant", "Hello human!"), Message("user", "What is your name?")]


@pytest.mark.parametrize("template", [MISTRAL_LEGACY, MISTRAL_LEGACY_RESPONSE, MISTRAL_MESSAGES])
def test_execute_with_messages_mistral(template: str) -> None:
    assert render_chat(template, HELLO) == "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "


@pytest.mark.parametrize("template", [MISTRAL_LEGACY, MISTRAL_LEGACY_RESPONSE, MISTRAL_MESSAGES])
def test_execute_with_messages_mistral_system(template: str) -> None:
    messages = [Message("system", "You are a helpful assistant!"), *HELLO]
    assert render_chat(template, messages) == (
        "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] "
    )


@pytest.mark.parametrize(
    "template",
    [
        "[INST] {{ .Prompt }}[/INST] ",
        "[INST] {{ .Prompt }}[/INST] {{ .Response }}",
        '\n{{- range $i, $m := .Messages }}\n{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST] '
        '{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}\n{{- end }}',
    ],
)
def test_execute_with_messages_assistant_prefill(template: str) -> None:
    messages = [*HELLO, Message("assistant", "My name is Ollama and I")]
    assert render_chat(template, messages) == (
        "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
        "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        "\n{{- range $index, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
    ],
)
def test_execute_with_messages_chatml(template: str) -> None:
    messages = [Message("system", "You are a helpful assistant!"), *HELLO]
    assert render_chat(template, messages) == (
        "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
        "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


SUFFIX_TEMPLATE = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>\n{{- else }}{{ .Prompt }}\n{{- end }}"


def test_execute_with_suffix() -> None:
    assert render_chat(SUFFIX_TEMPLATE, [Message("user", "hello")]) == "hello"
    rendered = render_generate(SUFFIX_TEMPLATE, prompt="def add(", suffix="return x")
    assert rendered == "<PRE> def add( <SUF>return x <MID>"
    assert template_uses(SUFFIX_TEMPLATE, "suffix")
    assert not template_uses(SUFFIX_TEMPLATE, "tools")


def test_consecutive_messages_are_merged_but_not_tool_messages() -> None:
    template = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}{{ with .ToolName }}@{{ . }}{{ end }}]{{ end }}"
    messages = [
        Message("user", "Hello"),
        Message("user", "How are you?"),
        Message("tool", "sunny", tool_name="get_weather"),
        Message("tool", "72F", tool_name="get_temperature"),
    ]
    assert render_chat(template, messages) == (
        "[user:Hello\n\nHow are you?][tool:sunny@get_weather][tool:72F@get_temperature]"
    )


# --- server/testdata/tools: tool-calling templates with their expected prompts ------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "format": {
                        "type": "string",
                        "enum": ["celsius", "fahrenheit"],
                        "description": "The temperature unit to use. Infer this from the user's location.",
                    },
                },
                "required": ["location", "format"],
            },
        },
    }
]
TOOL_MESSAGES = [
    Message("system", "You are a knowledgeable assistant. You can answer questions and perform tasks."),
    Message("user", "What's the weather like today in Paris?"),
    Message(
        "assistant",
        tool_calls=(
            ToolCall("get_current_weather", {"location": "Paris, France", "format": "celsius"},
                     id="89a1e453-0bce-4de3-a456-c54bed09c520"),
        ),
    ),  # fmt: skip
    Message("tool", "22", tool_call_id="89a1e453-0bce-4de3-a456-c54bed09c520"),
    Message("assistant", "The current temperature in Paris, France is 22 degrees Celsius."),
    Message("user", "What's the weather like today in San Francisco and Toronto?"),
]
TOOLS_JSON = (
    '{"type":"function","function":{"name":"get_current_weather","description":"Get the current weather",'
    '"parameters":{"type":"object","required":["location","format"],"properties":{"format":{"type":"string",'
    '"description":"The temperature unit to use. Infer this from the user\'s location.","enum":["celsius",'
    '"fahrenheit"]},"location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"}}}}}'
)

LLAMA32_TOOLS = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n"
    "{{ if .System }}{{ .System }}\n{{- end }}\n{{- if .Tools }}When you receive a tool call response, use the output "
    "to format an answer to the orginal user question.\n\nYou are a helpful assistant with tool calling capabilities.\n"
    "{{- end }}<|eot_id|>\n{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n{{- if and $.Tools $last }}\n\n'
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}. Do not use variables.\n\n{{ range $.Tools }}\n{{- . }}\n{{ end }}\n"
    "{{ .Content }}<|eot_id|>\n{{- else }}\n\n{{ .Content }}<|eot_id|>\n{{- end }}{{ if $last }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n"
    '{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n{{- if .ToolCalls }}\n'
    '{{ range .ToolCalls }}\n{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}\n'
    "{{- else }}\n\n{{ .Content }}\n{{- end }}{{ if not $last }}<|eot_id|>{{ end }}\n"
    '{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
    "{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n{{- end }}\n{{- end }}"
)
LLAMA32_OUT = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\nYou are a knowledgeable "
    "assistant. You can answer questions and perform tasks.When you receive a tool call response, use the output to "
    "format an answer to the orginal user question.\n\nYou are a helpful assistant with tool calling capabilities."
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat's the weather like today in Paris?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_current_weather\", \"parameters\": "
    '{"format":"celsius","location":"Paris, France"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n22'
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe current temperature in Paris, France is 22 "
    "degrees Celsius.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please "
    "respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not '
    "use variables.\n\n" + TOOLS_JSON + "\n\nWhat's the weather like today in San Francisco and Toronto?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

MISTRAL_TOOLS = (
    '{{- range $index, $_ := .Messages }}\n{{- if eq .Role "user" }}\n'
    "{{- if and (eq (len (slice $.Messages $index)) 1) $.Tools }}[AVAILABLE_TOOLS] {{ $.Tools }}[/AVAILABLE_TOOLS]\n"
    "{{- end }}[INST] {{ if and (eq (len (slice $.Messages $index)) 1) $.System }}{{ $.System }}\n\n{{ end }}"
    '{{ .Content }}[/INST]\n{{- else if eq .Role "assistant" }}\n{{- if .Content }} {{ .Content }}</s>\n'
    "{{- else if .ToolCalls }}[TOOL_CALLS] [\n{{- range .ToolCalls }}{\"name\": \"{{ .Function.Name }}\", "
    '"arguments": {{ .Function.Arguments }}}\n{{- end }}]</s>\n{{- end }}\n'
    '{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}}[/TOOL_RESULTS]\n{{- end }}\n{{- end }}'
)
MISTRAL_OUT = (
    "[INST] What's the weather like today in Paris?[/INST][TOOL_CALLS] [{\"name\": \"get_current_weather\", "
    '"arguments": {"format":"celsius","location":"Paris, France"}}]</s>[TOOL_RESULTS] {"content": 22}'
    "[/TOOL_RESULTS] The current temperature in Paris, France is 22 degrees Celsius.</s>[AVAILABLE_TOOLS] ["
    + TOOLS_JSON + "][/AVAILABLE_TOOLS][INST] You are a knowledgeable assistant. You can answer questions and perform "
    "tasks.\n\nWhat's the weather like today in San Francisco and Toronto?[/INST]"
)


def test_llama32_tools() -> None:
    assert render_chat(LLAMA32_TOOLS, TOOL_MESSAGES, tools=TOOLS) == LLAMA32_OUT
    assert template_uses(LLAMA32_TOOLS, "tools")


def test_mistral_tools() -> None:
    assert render_chat(MISTRAL_TOOLS, TOOL_MESSAGES, tools=TOOLS) == MISTRAL_OUT
