"""Tokenizer for Go ``text/template`` source, following ``text/template/parse/lex.go``.

Trim markers behave exactly as in Go: ``{{- `` (dash then a space character)
removes all trailing white space (space, tab, CR, LF) from the text before it,
`` -}}`` removes all leading white space from the text after it. Comments
``{{/* */}}`` vanish, honouring their trim markers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto

from .errors import TemplateError, line_col

__all__ = ["KEYWORDS", "Item", "Kind", "lex"]

LEFT, RIGHT = "{{", "}}"
LEFT_COMMENT, RIGHT_COMMENT = "/*", "*/"
SPACE_CHARS = " \t\r\n"


class Kind(Enum):
    TEXT = auto()
    LEFT_DELIM = auto()
    RIGHT_DELIM = auto()
    SPACE = auto()
    PIPE = auto()
    LPAREN = auto()
    RPAREN = auto()
    DECLARE = auto()
    ASSIGN = auto()
    CHAR = auto()  # any other printable ASCII character, e.g. ","
    CHAR_CONSTANT = auto()
    STRING = auto()
    RAW_STRING = auto()
    NUMBER = auto()
    BOOL = auto()
    NIL = auto()
    DOT = auto()
    FIELD = auto()
    VARIABLE = auto()
    IDENTIFIER = auto()
    KEYWORD = auto()
    EOF = auto()


KEYWORDS = frozenset(
    {"if", "else", "end", "range", "with", "break", "continue", "define", "template", "block"}
)


@dataclass(frozen=True, slots=True)
class Item:
    kind: Kind
    value: str
    pos: int


_NUMBER = re.compile(
    r"[+-]?(?:0[xX][0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?(?:[pP][+-]?[0-9_]+)?"
    r"|0[bB][01_]+|0[oO][0-7_]+"
    r"|(?:[0-9][0-9_]*)?\.?[0-9_]*(?:[eE][+-]?[0-9_]+)?)i?"
)
_ALNUM = re.compile(r"[\w]*", re.UNICODE)


def _is_space(ch: str) -> bool:
    return ch != "" and ch in SPACE_CHARS


def _has_left_trim(s: str, i: int) -> bool:
    return i + 1 < len(s) and s[i] == "-" and _is_space(s[i + 1])


def _has_right_trim(s: str, i: int) -> bool:
    return i + 1 < len(s) and _is_space(s[i]) and s[i + 1] == "-"


class _Lexer:
    def __init__(self, text: str) -> None:
        self.s = text
        self.pos = 0
        self.items: list[Item] = []
        self.paren_depth = 0

    def fail(self, message: str, pos: int | None = None) -> TemplateError:
        line, col = line_col(self.s, self.pos if pos is None else pos)
        return TemplateError(message, line=line, col=col)

    def emit(self, kind: Kind, value: str, pos: int) -> None:
        self.items.append(Item(kind, value, pos))

    def at_right_delim(self, i: int) -> tuple[bool, bool]:
        if _has_right_trim(self.s, i) and self.s.startswith(RIGHT, i + 2):
            return True, True
        return self.s.startswith(RIGHT, i), False

    def run(self) -> list[Item]:
        s = self.s
        while True:
            start = self.pos
            x = s.find(LEFT, start)
            if x < 0:
                if start < len(s):
                    self.emit(Kind.TEXT, s[start:], start)
                self.emit(Kind.EOF, "", len(s))
                return self.items
            text = s[start:x]
            if _has_left_trim(s, x + 2):
                text = text.rstrip(SPACE_CHARS)
            if text:
                self.emit(Kind.TEXT, text, start)
            self.pos = x + 2
            trim = _has_left_trim(s, self.pos)
            after = self.pos + (2 if trim else 0)
            if s.startswith(LEFT_COMMENT, after):
                self.lex_comment(after)
                continue
            self.emit(Kind.LEFT_DELIM, LEFT, x)
            self.pos = after
            self.paren_depth = 0
            self.lex_action()

    def lex_comment(self, start: int) -> None:
        end = self.s.find(RIGHT_COMMENT, start + 2)
        if end < 0:
            raise self.fail("unclosed comment", start)
        self.pos = end + 2
        delim, trim = self.at_right_delim(self.pos)
        if not delim:
            raise self.fail("comment ends before closing delimiter")
        self.pos += (2 if trim else 0) + 2
        if trim:
            self.skip_leading_space()

    def skip_leading_space(self) -> None:
        while self.pos < len(self.s) and self.s[self.pos] in SPACE_CHARS:
            self.pos += 1

    def lex_right_delim(self) -> None:
        _, trim = self.at_right_delim(self.pos)
        if trim:
            self.pos += 2
        self.emit(Kind.RIGHT_DELIM, RIGHT, self.pos)
        self.pos += 2
        if trim:
            self.skip_leading_space()

    def lex_action(self) -> None:  # noqa: C901 - one branch per token kind, as in lex.go
        s = self.s
        while True:
            delim, _ = self.at_right_delim(self.pos)
            if delim:
                if self.paren_depth:
                    raise self.fail("unclosed left paren")
                self.lex_right_delim()
                return
            if self.pos >= len(s):
                raise self.fail("unclosed action")
            start = self.pos
            ch = s[start]
            if _is_space(ch):
                end = start
                while end < len(s) and _is_space(s[end]):
                    end += 1
                # " -}}" after a run of spaces: the last space belongs to the delimiter.
                if _has_right_trim(s, end - 1) and s.startswith(RIGHT, end + 1):
                    if end - start == 1:
                        self.lex_right_delim()
                        return
                    end -= 1
                self.emit(Kind.SPACE, s[start:end], start)
                self.pos = end
            elif ch == "=":
                self.emit(Kind.ASSIGN, ch, start)
                self.pos += 1
            elif ch == ":":
                if not s.startswith(":=", start):
                    raise self.fail("expected :=")
                self.emit(Kind.DECLARE, ":=", start)
                self.pos += 2
            elif ch == "|":
                self.emit(Kind.PIPE, ch, start)
                self.pos += 1
            elif ch == '"':
                self.lex_quote(start)
            elif ch == "`":
                end = s.find("`", start + 1)
                if end < 0:
                    raise self.fail("unterminated raw quoted string", start)
                self.emit(Kind.RAW_STRING, s[start : end + 1], start)
                self.pos = end + 1
            elif ch == "'":
                self.lex_char(start)
            elif ch == "$" or (ch == "." and not (start + 1 < len(s) and s[start + 1].isdigit())):
                self.lex_field_or_variable(start)
            elif ch in "+-." or ch.isdigit():
                m = _NUMBER.match(s, start)
                end = m.end() if m else start
                if end == start or (end < len(s) and (s[end].isalnum() or s[end] == "_")):
                    raise self.fail(f"bad number syntax: {s[start : end + 1]!r}", start)
                self.emit(Kind.NUMBER, s[start:end], start)
                self.pos = end
            elif ch.isalnum() or ch == "_":
                self.lex_identifier(start)
            elif ch == "(":
                self.emit(Kind.LPAREN, ch, start)
                self.paren_depth += 1
                self.pos += 1
            elif ch == ")":
                self.emit(Kind.RPAREN, ch, start)
                self.paren_depth -= 1
                if self.paren_depth < 0:
                    raise self.fail("unexpected right paren")
                self.pos += 1
            elif ch.isascii() and ch.isprintable():
                self.emit(Kind.CHAR, ch, start)
                self.pos += 1
            else:
                raise self.fail(f"unrecognized character in action: {ch!r}")

    def lex_quote(self, start: int) -> None:
        i = start + 1
        s = self.s
        while True:
            if i >= len(s) or s[i] == "\n":
                raise self.fail("unterminated quoted string", start)
            if s[i] == "\\":
                i += 2
                continue
            if s[i] == '"':
                break
            i += 1
        self.emit(Kind.STRING, s[start : i + 1], start)
        self.pos = i + 1

    def lex_char(self, start: int) -> None:
        i = start + 1
        s = self.s
        while True:
            if i >= len(s) or s[i] == "\n":
                raise self.fail("unterminated character constant", start)
            if s[i] == "\\":
                i += 2
                continue
            if s[i] == "'":
                break
            i += 1
        self.emit(Kind.CHAR_CONSTANT, s[start : i + 1], start)
        self.pos = i + 1

    def at_terminator(self, i: int) -> bool:
        if i >= len(self.s):
            return True
        ch = self.s[i]
        if _is_space(ch) or ch in ".,|:()":
            return True
        return self.s.startswith(RIGHT, i)

    def lex_field_or_variable(self, start: int) -> None:
        kind_alone, kind = (Kind.VARIABLE, Kind.VARIABLE) if self.s[start] == "$" else (Kind.DOT, Kind.FIELD)
        if self.at_terminator(start + 1):
            self.emit(kind_alone, self.s[start], start)
            self.pos = start + 1
            return
        m = _ALNUM.match(self.s, start + 1)
        end = m.end() if m else start + 1
        if not self.at_terminator(end):
            raise self.fail(f"bad character {self.s[end]!r}", end)
        self.emit(kind, self.s[start:end], start)
        self.pos = end

    def lex_identifier(self, start: int) -> None:
        m = _ALNUM.match(self.s, start)
        end = m.end() if m else start
        if not self.at_terminator(end):
            raise self.fail(f"bad character {self.s[end]!r}", end)
        word = self.s[start:end]
        if word in KEYWORDS:
            kind = Kind.KEYWORD
        elif word in ("true", "false"):
            kind = Kind.BOOL
        elif word == "nil":
            kind = Kind.NIL
        else:
            kind = Kind.IDENTIFIER
        self.emit(kind, word, start)
        self.pos = end


def lex(text: str) -> list[Item]:
    """Split template ``text`` into items; raises :class:`TemplateError` on bad syntax."""
    return _Lexer(text).run()
