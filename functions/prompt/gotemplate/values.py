"""Go value semantics over Python data: truth, ``fmt`` printing, ``encoding/json``.

Python values stand for Go values as follows: ``None`` is nil, ``bool``,
``int``, ``float`` (float64) and ``str`` are themselves, ``list``/``tuple`` are
slices, ``dict`` is a map (printed and marshalled with sorted keys), and a
dataclass instance is a struct whose fields are its dataclass fields (named in
Go case). A struct (or a sequence/mapping subclass) may define

* ``go_string() -> str`` — its ``fmt.Stringer``, used when printed;
* ``go_json() -> object`` — what ``json.Marshal`` encodes instead of it; return
  :class:`JsonObject` to keep field order (a plain dict is sorted, as Go sorts
  map keys).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

__all__ = [
    "JsonObject",
    "go_json",
    "go_print",
    "go_type_name",
    "is_struct",
    "is_true",
    "sort_key",
    "format_float",
]


class JsonObject:
    """An ordered JSON object: a Go struct's fields in declaration order."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: Sequence[tuple[str, Any]]) -> None:
        self.pairs = tuple(pairs)


def is_struct(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def go_type_name(value: object) -> str:
    """The Go type a value stands for, as shown in error messages."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map[string]interface {}"
    if isinstance(value, (list, tuple)):
        return "[]interface {}"
    return type(value).__name__


def is_true(value: object) -> bool:
    """Go template truth: false, 0, nil, and empty string/slice/map are false; structs true."""
    if value is None:
        return False
    if isinstance(value, (bool, int, float)):
        return value != 0
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value) > 0
    return True


# --- numbers ------------------------------------------------------------------------


def _shortest_digits(f: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of ``|f|`` and the decimal exponent of the first digit."""
    _sign, digits, exp = Decimal(repr(abs(f))).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    point = len(digits) + int(exp)  # digits before the decimal point
    return text, point - 1


def format_float(f: float, *, json_style: bool = False) -> str:
    """Go's ``%v`` for float64 (``strconv.FormatFloat(f, 'g', -1, 64)``), or its JSON encoding."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    digits, exp = _shortest_digits(f)
    sign = "-" if f < 0 else ""
    if json_style:
        use_exp = abs(f) < 1e-6 or abs(f) >= 1e21
    else:
        # strconv 'g' with the shortest precision switches to %e at exponent 6.
        use_exp = exp < -4 or exp >= 6
    if use_exp:
        mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        e_sign = "-" if exp < 0 else "+"
        e_digits = f"{abs(exp):02d}" if not json_style else str(abs(exp))
        return f"{sign}{mant}e{e_sign}{e_digits}"
    if exp < 0:
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    if len(digits) <= exp + 1:
        return sign + digits + "0" * (exp + 1 - len(digits))
    return f"{sign}{digits[: exp + 1]}.{digits[exp + 1 :]}"


# --- fmt printing ---------------------------------------------------------------------


def go_print(value: object, *, top: bool = True) -> str:
    """``fmt.Sprint`` of one value as a template action prints it."""
    if value is None:
        return "<no value>" if top else "<nil>"
    stringer = getattr(value, "go_string", None)
    if callable(stringer):
        return str(stringer())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return "[" + " ".join(str(b) for b in value) + "]"
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: sort_key(kv[0]))
        return "map[" + " ".join(f"{go_print(k, top=False)}:{go_print(v, top=False)}" for k, v in items) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_print(v, top=False) for v in value) + "]"
    if is_struct(value):
        fields = dataclasses.fields(value)  # type: ignore[arg-type]
        return "{" + " ".join(go_print(getattr(value, f.name), top=False) for f in fields) + "}"
    return str(value)


def sort_key(key: object) -> tuple[int, Any]:
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return (0, key)
    return (1, str(key))


# --- encoding/json ----------------------------------------------------------------------

_HTML_SAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _json_string(s: str) -> str:
    # json.dumps escapes exactly Go's control characters (\b \f \n \r \t short, the
    # rest \u00XX); Go additionally HTML-escapes and escapes U+2028/U+2029.
    out = json.dumps(s, ensure_ascii=False)
    if any(c in s for c in _HTML_SAFE):
        out = "".join(_HTML_SAFE.get(c, c) for c in out)
    return out


def go_json(value: object) -> str:
    """``json.Marshal`` as Go writes it: compact, map keys sorted, HTML-escaped."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value: object, out: list[str]) -> None:
    custom = getattr(value, "go_json", None)
    if callable(custom):
        value = custom()
    if value is None:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"json: unsupported value: {format_float(value)}")
        out.append(format_float(value, json_style=True))
    elif isinstance(value, str):
        out.append(_json_string(value))
    elif isinstance(value, JsonObject):
        _encode_pairs(value.pairs, out)
    elif isinstance(value, Mapping):
        _encode_pairs(sorted(((str(k), v) for k, v in value.items()), key=lambda kv: kv[0]), out)
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif is_struct(value):
        fields = dataclasses.fields(value)  # type: ignore[arg-type]
        _encode_pairs([(f.name, getattr(value, f.name)) for f in fields], out)
    else:
        raise ValueError(f"json: unsupported type: {type(value).__name__}")


def _encode_pairs(pairs: Sequence[tuple[str, Any]], out: list[str]) -> None:
    out.append("{")
    for i, (key, item) in enumerate(pairs):
        if i:
            out.append(",")
        out.append(_json_string(key))
        out.append(":")
        _encode(item, out)
    out.append("}")
