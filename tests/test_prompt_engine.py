"""Unit tests of the Go text/template engine pieces."""

from __future__ import annotations

import pytest

from omx.functions.prompt import TemplateError, TemplateExecutionError
from omx.functions.prompt.gotemplate import go_json, parse


def run(source: str, data: object = None) -> str:
    return parse(source).execute({} if data is None else data)


def test_trim_markers_remove_all_adjacent_whitespace() -> None:
    assert run("a \n\t {{- 1 -}} \n\n b") == "a1b"
    assert run("a {{1}} b") == "a 1 b"
    assert run("x\n{{- /* note */ -}}\n  y") == "xy"
    assert run("{{-3}}") == "-3"  # no space after the dash: a negative number, not a trim


def test_range_with_else_and_variables() -> None:
    src = "{{ range $i, $m := .L }}{{ $i }}={{ $m }}/{{ $.X }} {{ else }}empty{{ end }}"
    assert run(src, {"L": ["a", "b"], "X": 7}) == "0=a/7 1=b/7 "
    assert run(src, {"L": [], "X": 7}) == "empty"
    assert run("{{ range .M }}{{ . }}{{ end }}", {"M": {"b": 2, "a": 1}}) == "12"  # sorted keys
    assert run("{{ range $k, $v := .M }}{{ $k }}{{ $v }}{{ end }}", {"M": {"b": 2, "a": 1}}) == "a1b2"


def test_dollar_and_dot_inside_range() -> None:
    data = {"Items": [{"N": "x"}, {"N": "y"}], "Sep": "-"}
    assert run("{{ range .Items }}{{ .N }}{{ $.Sep }}{{ end }}", data) == "x-y-"


def test_eq_multi_arg_and_comparisons() -> None:
    assert run('{{ if eq .R "a" "b" "c" }}yes{{ end }}', {"R": "c"}) == "yes"
    assert run('{{ if eq .R "a" "b" }}yes{{ else }}no{{ end }}', {"R": "c"}) == "no"
    assert run("{{ lt 1 2 }} {{ le 2 2 }} {{ gt 1 2 }} {{ ge 3 2 }} {{ ne 1 2 }}") == "true true false true true"
    with pytest.raises(TemplateExecutionError, match="incompatible types"):
        run('{{ eq 1 "1" }}')


def test_nested_if_else_if_and_with() -> None:
    src = '{{ if eq .N 1 }}one{{ else if eq .N 2 }}two{{ else if eq .N 3 }}three{{ else }}many{{ end }}'
    assert [run(src, {"N": i}) for i in (1, 2, 3, 4)] == ["one", "two", "three", "many"]
    assert run("{{ with .A }}[{{ . }}]{{ else }}none{{ end }}", {"A": "x"}) == "[x]"
    assert run("{{ with .A }}[{{ . }}]{{ else }}none{{ end }}", {"A": ""}) == "none"


def test_slice_len_index() -> None:
    data = {"L": [1, 2, 3, 4]}
    assert run("{{ len (slice .L 1 3) }} {{ slice .L 2 }} {{ index .L 3 }}", data) == "2 [3 4] 4"
    assert run('{{ len "héllo" }}') == "6"  # bytes, as Go counts
    assert run('{{ index .M "missing" }}', {"M": {}}) == "<no value>"
    with pytest.raises(TemplateExecutionError, match="index out of range: 9"):
        run("{{ index .L 9 }}", data)


def test_variable_scoping_and_assignment() -> None:
    assert run("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}") == "2"
    with pytest.raises(TemplateError, match='undefined variable "\\$y"'):
        parse("{{ if true }}{{ $y := 1 }}{{ end }}{{ $y }}")


def test_truthiness() -> None:
    src = "{{ if . }}T{{ else }}F{{ end }}"
    assert [parse(src).execute(v) for v in ("", 0, None, [], {}, 0.0, False)] == ["F"] * 7
    assert [parse(src).execute(v) for v in ("a", 1, [0], {"a": 0}, True)] == ["T"] * 5


def test_printing_like_go() -> None:
    assert run("{{ .B }} {{ .F }} {{ .G }} {{ .N }} {{ .L }} {{ .M }}",
               {"B": True, "F": 1e6, "G": 2.5, "N": None, "L": [1, "a"], "M": {"k": 1}}) == (
        "true 1e+06 2.5 <no value> [1 a] map[k:1]"
    )  # fmt: skip
    assert run('{{ printf "%s|%5d|%-4s|%.2f|%q|%v|%t" "a" 42 "b" 3.14159 "q\\"" 1.5 true }}') == (
        'a|   42|b   |3.14|"q\\""|1.5|true'
    )
    assert run('{{ print "a" 1 2 "b" }}|{{ println 1 "x" }}') == "a1 2b|1 x\n"


def test_pipelines_and_parentheses() -> None:
    assert run('{{ "abc" | len }} {{ .S | printf "<%s>" }} {{ (index .L 0).N }}', {"S": "x", "L": [{"N": 5}]}) == (
        "3 <x> 5"
    )
    assert run("{{ and 1 0 2 }} {{ or 0 \"\" 3 }} {{ not 0 }}") == "0 3 true"


def test_break_continue_and_range_int() -> None:
    src = (
        "{{ range $i, $e := .L }}{{ if eq $i 1 }}{{ continue }}{{ end }}"
        "{{ if eq $i 3 }}{{ break }}{{ end }}{{ $e }}{{ end }}"
    )
    assert run(src, {"L": list("abcde")}) == "ac"
    assert run("{{ range 3 }}{{ . }}{{ end }}") == "012"


def test_literals() -> None:
    assert run('{{ `raw\\n` }} {{ "tab\\there" }} {{ 0x10 }} {{ \'a\' }} {{ 1.5e3 }} {{ nil | print }}') == (
        "raw\\n tab\there 16 97 1500 <nil>"
    )


def test_json_is_go_style() -> None:
    assert go_json({"b": 1, "a": "<x>&", "c": [1.0, 0.5, None, True]}) == (
        '{"a":"\\u003cx\\u003e\\u0026","b":1,"c":[1,0.5,null,true]}'
    )
    assert go_json("é\n\u2028") == '"é\\n\\u2028"'
    assert go_json(1e21) == "1e+21" and go_json(1e-7) == "1e-7" and go_json(123456789.0) == "123456789"


def test_missing_struct_field_is_an_error() -> None:
    from omx.functions.prompt.goviews import MessageView

    with pytest.raises(TemplateExecutionError, match="can't evaluate field Nope"):
        run("{{ .Nope }}", MessageView(Role="user"))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ if .A }}x", "unexpected EOF"),
        ("{{ end }}", "unexpected {{end}}"),
        ("{{ nofunc 1 }}", 'function "nofunc" not defined'),
        ("{{ .A", "unclosed action"),
        ('{{ "abc }}', "unterminated quoted string"),
        ("{{ break }}", "outside {{range}}"),
        ("{{ define \"x\" }}{{ end }}", "not supported"),
        ("a\n{{ if }}", "missing value for if"),
        ("{{ . | 1 }}", "non executable command"),
        ("{{/* open }}", "unclosed comment"),
    ],
)
def test_parse_errors(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message) as info:
        parse(source)
    assert info.value.status == 400
    assert info.value.line >= 1


def test_parse_error_position() -> None:
    with pytest.raises(TemplateError) as info:
        parse("line one\nline {{ if }}")
    assert (info.value.line, info.value.col) == (2, 12)  # at the closing delimiter
