"""Go literal syntax: string/char unquoting, number constants, ``%q`` quoting."""

from __future__ import annotations

import re

__all__ = ["go_quote", "parse_number", "unquote"]

_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_ESCAPE = re.compile(r"\\(?:([abfnrtv\\'\"])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|([0-7]{3}))")


def _unescape(body: str, quote: str) -> str:
    out: list[str] = []
    i = 0
    pending: bytearray = bytearray()  # \x and octal escapes are bytes in Go

    def flush() -> None:
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()

    while i < len(body):
        ch = body[i]
        if ch != "\\":
            flush()
            out.append(ch)
            i += 1
            continue
        m = _ESCAPE.match(body, i)
        if m is None:
            raise ValueError(f"invalid syntax: bad escape in {quote}{body}{quote}")
        simple, hex2, u4, u8, octal = m.groups()
        if simple is not None:
            if simple in "'\"" and simple != quote:
                raise ValueError(f"invalid syntax: bad escape \\{simple}")
            flush()
            out.append(_SIMPLE.get(simple, simple))
        elif hex2 is not None or octal is not None:
            value = int(hex2, 16) if hex2 is not None else int(octal, 8)
            if value > 255:
                raise ValueError("invalid syntax: octal escape out of range")
            pending.append(value)
        else:
            flush()
            out.append(chr(int(u4 or u8, 16)))
        i = m.end()
    flush()
    return "".join(out)


def unquote(literal: str) -> str:
    """The value of a Go string literal ("…" with escapes, or `raw`)."""
    if len(literal) >= 2 and literal[0] == literal[-1] == "`":
        return literal[1:-1].replace("\r", "")
    if len(literal) >= 2 and literal[0] == literal[-1] == '"':
        return _unescape(literal[1:-1], '"')
    raise ValueError(f"invalid syntax: {literal}")


def parse_number(text: str) -> int | float:
    """A Go numeric or character constant as an int (when integral syntax) or float."""
    if text.startswith("'"):
        value = _unescape(text[1:-1], "'")
        if len(value) != 1:
            raise ValueError(f"malformed character constant: {text}")
        return ord(value)
    if text.endswith("i"):
        raise ValueError(f"complex constants are not supported: {text}")
    clean = text.replace("_", "")
    sign = -1 if clean.startswith("-") else 1
    body = clean.lstrip("+-")
    lower = body.lower()
    try:
        if lower.startswith("0x"):
            if "." in lower or "p" in lower:
                return sign * float.fromhex(body)
            return sign * int(body, 16)
        if lower.startswith("0b"):
            return sign * int(body[2:], 2)
        if lower.startswith("0o"):
            return sign * int(body[2:], 8)
        if any(c in lower for c in ".e"):
            return sign * float(body)
        if len(body) > 1 and body.startswith("0"):
            return sign * int(body, 8)  # Go's legacy octal: 017 == 15
        return sign * int(body, 10)
    except ValueError:
        raise ValueError(f"illegal number syntax: {text!r}") from None


def go_quote(s: str) -> str:
    """``strconv.Quote``: a double-quoted Go string literal with Go escapes."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append("\\" + "abfnrtv"["\a\b\f\n\r\t\v".index(ch)])
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)
