"""Go's predefined template functions (``text/template/funcs.go``) and ``fmt`` printing.

Each function takes already-evaluated arguments and raises ``FuncError`` with
Go's wording on misuse. ``and``/``or`` short-circuit and are evaluated by the
executor itself; the versions here serve only as the eager fallback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .strings import go_quote
from .values import format_float, go_print, go_type_name, is_true

__all__ = ["ARITY", "BUILTINS", "FuncError", "sprintf"]


class FuncError(Exception):
    """A template function was called with bad arguments."""


_Func = Callable[..., Any]


def _kind(v: object) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"  # int/float compare numerically (Go would refuse mixing them)
    if isinstance(v, str):
        return "string"
    return "other"


def _eq(arg1: object = None, *others: object) -> bool:
    if not others:
        raise FuncError("missing argument for comparison")
    k1 = _kind(arg1)
    for arg in others:
        k2 = _kind(arg)
        if k1 != k2:
            if arg1 is not None and arg is not None:
                raise FuncError("incompatible types for comparison")
            truth = False
        elif k1 == "other":
            if isinstance(arg1, (list, tuple, Mapping)) or isinstance(arg, (list, tuple, Mapping)):
                raise FuncError(f"non-comparable type {go_type_name(arg1)}")
            truth = arg1 == arg
        else:
            truth = arg1 == arg
        if truth:
            return True
    return False


def _ne(arg1: object, arg2: object) -> bool:
    return not _eq(arg1, arg2)


def _lt(arg1: object, arg2: object) -> bool:
    k1, k2 = _kind(arg1), _kind(arg2)
    if k1 not in ("number", "string") or k2 not in ("number", "string"):
        raise FuncError("invalid type for comparison")
    if k1 != k2:
        raise FuncError("incompatible types for comparison")
    if k1 == "string":  # Go compares bytes; UTF-8 byte order equals code point order
        return str(arg1) < str(arg2)
    return bool(arg1 < arg2)  # type: ignore[operator]


def _le(a: object, b: object) -> bool:
    return _lt(a, b) or _eq(a, b)


def _gt(a: object, b: object) -> bool:
    return not _le(a, b)


def _ge(a: object, b: object) -> bool:
    return not _lt(a, b)


def _len(item: object) -> int:
    if item is None:
        raise FuncError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode("utf-8"))  # Go's len counts bytes
    if isinstance(item, (list, tuple, Mapping, bytes)):
        return len(item)
    raise FuncError(f"len of type {go_type_name(item)}")


def _index_arg(index: object, cap: int, *, inclusive: bool) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise FuncError(f"cannot index slice/array with type {go_type_name(index)}")
    if index < 0 or index > cap or (not inclusive and index == cap):
        raise FuncError(f"index out of range: {index}")
    return index


def _index(item: object, *indexes: object) -> object:
    if item is None:
        raise FuncError("index of untyped nil")
    for index in indexes:
        if item is None:
            raise FuncError("index of nil pointer")
        if isinstance(item, (list, tuple)):
            item = item[_index_arg(index, len(item), inclusive=False)]
        elif isinstance(item, str):
            raw = item.encode("utf-8")
            item = raw[_index_arg(index, len(raw), inclusive=False)]
        elif isinstance(item, Mapping):
            item = item.get(index)  # missing key: the zero value (nil for interface maps)
        else:
            raise FuncError(f"can't index item of type {go_type_name(item)}")
    return item


def _slice(item: object, *indexes: object) -> object:
    if item is None:
        raise FuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise FuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise FuncError("cannot 3-index slice a string")
        seq: Any = item.encode("utf-8")
    elif isinstance(item, (list, tuple)):
        seq = item
    else:
        raise FuncError(f"can't slice item of type {go_type_name(item)}")
    idx = [0, len(seq), len(seq)]
    for i, index in enumerate(indexes):
        idx[i] = _index_arg(index, len(seq), inclusive=True)
    if idx[0] > idx[1]:
        raise FuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise FuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    part = seq[idx[0] : idx[1]]
    if isinstance(item, str):
        return part.decode("utf-8", errors="replace")
    return type(item)(part) if isinstance(item, tuple) and type(item) is not tuple else part


def _not(arg: object) -> bool:
    return not is_true(arg)


def _and(*args: object) -> object:
    for arg in args[:-1]:
        if not is_true(arg):
            return arg
    return args[-1]


def _or(*args: object) -> object:
    for arg in args[:-1]:
        if is_true(arg):
            return arg
    return args[-1]


def _sprint(*args: object) -> str:
    # fmt.Sprint adds a space between operands when neither is a string.
    out: list[str] = []
    for i, arg in enumerate(args):
        if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(go_print(arg, top=False))
    return "".join(out)


def _sprintln(*args: object) -> str:
    return " ".join(go_print(a, top=False) for a in args) + "\n"


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+|\*)?)?([a-zA-Z%])")


def _format_one(verb: str, flags: str, width: int | None, prec: int | None, arg: object) -> str:
    def bad() -> str:
        return f"%!{verb}({go_type_name(arg)}={go_print(arg, top=False)})"

    is_int = isinstance(arg, int) and not isinstance(arg, bool)
    pyflags = "".join(f for f in flags if f in "-+ #0")
    if verb in "vs":
        text = go_print(arg, top=False) if verb == "v" or not isinstance(arg, str) else arg
        if verb == "s" and not isinstance(arg, str) and not hasattr(arg, "go_string"):
            if isinstance(arg, (int, float, bool)):
                return bad()
        if prec is not None and verb == "s":
            text = text[:prec]
        return _pad(text, flags, width)
    if verb == "d":
        if not is_int:
            return bad()
        return format(arg, f"{_align(flags)}{pyflags.replace('-', '').replace('#', '')}{width or ''}d")
    if verb in "xXob":
        if is_int:
            spec = f"{_align(flags)}{pyflags.replace('-', '')}{width or ''}{verb}"
            return format(arg, spec)
        if isinstance(arg, str) and verb in "xX":
            hexed = arg.encode("utf-8").hex()
            return _pad(hexed.upper() if verb == "X" else hexed, flags, width)
        return bad()
    if verb in "feEgG":
        if not isinstance(arg, (int, float)) or isinstance(arg, bool):
            return bad()
        if verb in "gG" and prec is None:
            text = format_float(float(arg))
            text = text.upper() if verb == "G" else text
            return _pad(text, flags, width)
        p = 6 if prec is None else prec
        text = format(float(arg), f"{pyflags.replace('-', '')}.{p}{verb}")
        return _pad(text, flags, width)
    if verb == "t":
        if not isinstance(arg, bool):
            return bad()
        return _pad("true" if arg else "false", flags, width)
    if verb == "q":
        if isinstance(arg, str):
            return _pad(go_quote(arg), flags, width)
        if isinstance(arg, int) and is_int:
            return _pad("'" + go_quote(chr(arg))[1:-1].replace("'", "\\'") + "'", flags, width)
        return bad()
    if verb == "c":
        return _pad(chr(arg), flags, width) if isinstance(arg, int) and is_int else bad()
    if verb == "T":
        return _pad(go_type_name(arg), flags, width)
    return f"%!{verb}(" + f"{go_type_name(arg)}={go_print(arg, top=False)})"


def _align(flags: str) -> str:
    return "<" if "-" in flags else ""


def _pad(text: str, flags: str, width: int | None) -> str:
    if not width or len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    return text.rjust(width, "0" if "0" in flags else " ")


def sprintf(fmt: object, *args: object) -> str:
    """``fmt.Sprintf`` for the common verbs: v s d q t f e g x X o b c T %, with flags/width/precision."""
    if not isinstance(fmt, str):
        raise FuncError(f"wrong type for value; expected string; got {go_type_name(fmt)}")
    out: list[str] = []
    pos = 0
    argi = 0
    for m in _VERB.finditer(fmt):
        out.append(fmt[pos : m.start()])
        pos = m.end()
        flags, width_s, prec_s, verb = m.groups()
        if verb == "%":
            out.append("%")
            continue
        width: int | None = None
        prec: int | None = None
        if width_s == "*":
            width, argi = int(args[argi]) if argi < len(args) else 0, argi + 1  # type: ignore[call-overload]
        elif width_s:
            width = int(width_s)
        if prec_s == "*":
            prec, argi = int(args[argi]) if argi < len(args) else 0, argi + 1  # type: ignore[call-overload]
        elif prec_s is not None:
            prec = int(prec_s)
        elif "." in m.group(0):
            prec = 0
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        out.append(_format_one(verb, flags, width, prec, args[argi]))
        argi += 1
    out.append(fmt[pos:])
    if argi < len(args):
        extra = ", ".join(f"{go_type_name(a)}={go_print(a, top=False)}" for a in args[argi:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


BUILTINS: dict[str, _Func] = {
    "and": _and,
    "or": _or,
    "not": _not,
    "len": _len,
    "index": _index,
    "slice": _slice,
    "eq": _eq,
    "ne": _ne,
    "lt": _lt,
    "le": _le,
    "gt": _gt,
    "ge": _ge,
    "print": _sprint,
    "printf": sprintf,
    "println": _sprintln,
}
"""Go's predefined functions by name (``html``, ``js``, ``urlquery`` and ``call`` are not provided)."""

ARITY: dict[str, tuple[int, int | None]] = {
    "and": (1, None),
    "or": (1, None),
    "not": (1, 1),
    "len": (1, 1),
    "index": (1, None),
    "slice": (1, None),
    "eq": (1, None),
    "ne": (2, 2),
    "lt": (2, 2),
    "le": (2, 2),
    "gt": (2, 2),
    "ge": (2, 2),
    "print": (0, None),
    "printf": (1, None),
    "println": (0, None),
}
"""(min, max) argument counts; Go reports a wrong count as an execution error."""
