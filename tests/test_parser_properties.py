"""Property tests of the parsers that read untrusted text: no input makes them raise anything but their
documented errors.

- the Modelfile parser raises :class:`~omx.storage.modelfile.ModelfileError` (HTTP 400);
- the Go template engine raises :class:`TemplateError` when parsing and :class:`TemplateExecutionError`
  when rendering;
- the name parser raises :class:`~omx.errors.InvalidModelName` (names) and
  :class:`~omx.errors.InvalidDigest` (digests), and a parsed name parses again to itself.

Inputs are drawn from each grammar's own tokens (so most of them get deep into the parser) as well as
from arbitrary text; ``OMX_PROPERTY_EXAMPLES`` (default 300) sets how many per test.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omx.errors import InvalidDigest, InvalidModelName
from omx.functions.prompt.gotemplate import TemplateError, TemplateExecutionError, parse
from omx.storage.modelfile import ModelfileError, format_modelfile, parse_modelfile
from omx.storage.names import ModelName, parse_digest

SETTINGS = settings(max_examples=int(os.environ.get("OMX_PROPERTY_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ Modelfile

_COMMANDS = ["PARAMETER", "parameter", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "message", "#",
             "TEMPLATE", "SYSTEM", "LICENSE", "# comment", "FROM", "PARAMETER stop", "PARAMETER num_ctx",
             "PARAMETER temperature", "PARAMETER penalize_newline", "PARAMETER seed", "MESSAGE user",
             "MESSAGE narrator", "MESSAGE system"]
_VALUES = ["tiny", "./m.gguf", "@sha256:" + "a" * 64, "llama3:8b", '"', '"""', '"quoted"', '"""multi\nline"""',
           "1", "-1", "0.5", "1e309", "nan", "true", "TRUE", "yes", "9" * 30, "<|eot|>", "\\", "\t", " ", "é",
           "\x00", "{{ .Prompt }}", '"a" b', '""" x """ y']


@st.composite
def modelfiles(draw: Any) -> str:
    lines = [draw(st.sampled_from(["FROM tiny", "FROM ./m.gguf", "from @sha256:" + "a" * 64, "FROM \"a b\"", ""]))]
    for _ in range(draw(st.integers(0, 8))):
        command = draw(st.sampled_from(_COMMANDS) if draw(st.integers(0, 9)) else st.text(max_size=8))
        value = draw(st.lists(st.sampled_from(_VALUES) if draw(st.integers(0, 5)) else st.text(max_size=12),
                              min_size=1, max_size=2))
        lines.append(" ".join([command, *value]))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


@SETTINGS
@given(modelfiles() | st.text(max_size=300))
def test_the_modelfile_parser_raises_only_modelfile_errors(text: str) -> None:
    try:
        modelfile = parse_modelfile(text)
    except ModelfileError:
        return
    assert modelfile.from_
    # What /api/show prints (FROM the weights' path) reads back as the same model.
    shown = format_modelfile(model_path="/store/blobs/sha256-" + "a" * 64, short_name="m", template=modelfile.template,
                             system=modelfile.system, parameters=modelfile.parameters, license=modelfile.license,
                             messages=modelfile.messages, adapter_paths=modelfile.adapters)
    again = parse_modelfile(shown)
    # An empty TEMPLATE or SYSTEM is not printed (as Ollama's show does): it reads back as absent.
    assert (again.template, again.system, again.license, again.messages, dict(again.parameters)) == (
        modelfile.template or None, modelfile.system or None, modelfile.license, modelfile.messages,
        dict(modelfile.parameters))


# ------------------------------------------------------------------ Go templates

_TOKENS = [".", "$", "$x", "$i", ":=", "=", "|", "(", ")", " ", " ", " ", "\n", "if", "else", "else if", "end",
           "range", "with", "break", "continue", "define", "template", ".Messages", ".Prompt", ".System", ".Tools",
           ".Response", ".Role", ".Content", "$.Messages", "len", "index", "slice", "printf", "print", "println",
           "and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "json", "html", "call", "nil", "true", "false",
           "0", "1", "2", "-1", "3.5", "1e3", "0x1F", "'a'", "'\\n'", '"s"', '"%d %s %v %q"', '"\\x"', "`raw`",
           "text", "é", ","]
_DATA = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def template_data(draw: Any) -> dict[str, Any]:
    messages = draw(st.lists(st.fixed_dictionaries({"Role": st.sampled_from(["user", "assistant", "system"]),
                                                    "Content": st.text(max_size=6)}), max_size=3))
    return {"Messages": messages, "Prompt": draw(st.text(max_size=6)), "System": draw(st.text(max_size=6)),
            "Tools": draw(_DATA), "Response": draw(_DATA), "Extra": draw(_DATA)}


_EXPRS = [".Prompt", ".System", "$.Messages", ".Messages", "len .Messages", "index .Messages 0", "index .Extra 1",
          'printf "%d %s %v %q %x" 1 .Prompt .Extra .Response', "slice .Prompt 1", "slice .Extra 0 2",
          'eq .Prompt "x"', "json .Tools", "and .Tools .Prompt", "or .Extra 0", "not .Extra", ".Extra.a",
          'index .Extra "a"', "(len .Prompt)", "1.5", "'a'", "nil", "print .Extra .Response", "lt 1 .Extra",
          "gt .Extra .Response", "len .Extra", ".Response.x.y", "$", "$.Extra", ". | len", ".Prompt | printf",
          "$x", "-1", "0", "3", "le .Extra 2", "ne nil .Tools"]


@st.composite
def templates(draw: Any, depth: int = 2) -> str:
    """Text, actions and blocks (``if``, ``range``, ``with``) over mostly sensible expressions, spiced
    with stray tokens, trim markers and unbalanced braces."""
    pieces = []
    for _ in range(draw(st.integers(1, 5))):
        expr = draw(st.sampled_from(_EXPRS))
        if draw(st.integers(0, 9)) == 0:
            expr += "".join(draw(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=4)))
        inner = draw(templates(depth - 1)) if depth > 0 else "x"
        kind = draw(st.integers(0, 24))
        left, right = draw(st.sampled_from([("{{ ", " }}"), ("{{- ", " -}}"), ("{{", "}}")]))
        if kind == 0:
            pieces.append(f"{left}if {expr}{right}{inner}{left}else{right}y{left}end{right}")
        elif kind == 1:
            pieces.append(f"{left}range $i, $e := {expr}{right}{inner}{{{{ $e }}}}{left}end{right}")
        elif kind == 2:
            pieces.append(f"{left}with {expr}{right}{inner}{{{{ . }}}}{left}end{right}")
        elif kind == 3:
            pieces.append(f"{left}$x := {expr}{right}{inner}{{{{ $x }}}}")
        elif kind == 4 and draw(st.booleans()):
            pieces.append(draw(st.sampled_from(["{{", "}}", "{{/* c */}}", "{{ end }}", "{{ break }}", "{"])))
        else:
            pieces.append(f"{left}{expr}{right}")
        pieces.append(draw(st.sampled_from(["", "x", "\n", " "])))
    return "".join(pieces)


@SETTINGS
@given(templates() | st.text(max_size=60), template_data())
def test_the_template_engine_raises_only_template_errors(source: str, data: dict[str, Any]) -> None:
    try:
        template = parse(source)
    except TemplateError:
        return
    try:
        assert isinstance(template.execute(data), str)
    except TemplateExecutionError:
        pass


# ------------------------------------------------------------------ names and digests

_NAME_PARTS = ["library", "tiny", "llama3.2", "hf.co", "localhost:5000", "registry.ollama.ai", "a", "_x", "-x",
               "..", ".", "x..y", "Q4_K_M", "v1.2", "latest", "é", "a b", "\\", "\x00", "@sha256:" + "a" * 64,
               "sha256:" + "b" * 64, "1" * 90]


@SETTINGS
@given(st.lists(st.sampled_from(_NAME_PARTS) | st.sampled_from(["/", ":", "@"]), max_size=8).map("".join)
       | st.text(max_size=120))
def test_the_name_parser_raises_only_invalid_model_name(text: str) -> None:
    try:
        name = ModelName.parse(text)
    except InvalidModelName:
        return
    assert ModelName.parse(name.full) == name
    assert ModelName.parse(name.display) == name


@SETTINGS
@given(st.text(max_size=80) | st.just("sha256:").map(lambda p: p + "c" * 64)
       | st.text(alphabet="0123456789abcdefABCDEF:sha-", max_size=75))
def test_the_digest_parser_raises_only_invalid_digest(text: str) -> None:
    try:
        digest = parse_digest(text)
    except InvalidDigest:
        return
    assert parse_digest(digest) == digest
