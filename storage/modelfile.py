"""Modelfiles: parsing (as Ollama's ``parser`` package does) and the text ``/api/show`` returns.

Grammar: one command per line, case-insensitive, ``#`` starts a comment line::

    FROM <model name | @sha256:… | path>
    ADAPTER <name | @sha256:… | path>
    PARAMETER <name> <value>          (repeat ``stop`` for several)
    TEMPLATE|SYSTEM|LICENSE <value>
    MESSAGE <system|user|assistant|tool> <value>

A value is the rest of the line, or a ``"…"`` / ``\"\"\"…\"\"\"`` string that may span
lines. Parameters are typed by Ollama's option types (ints, floats, bools, a
list for ``stop``); an unknown name or a bad value is an error naming the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omx.errors import InvalidRequest

__all__ = [
    "BOOL_PARAMS",
    "FLOAT_PARAMS",
    "INT_PARAMS",
    "Modelfile",
    "ModelfileError",
    "coerce_parameter",
    "coerce_parameters",
    "format_modelfile",
    "format_parameters",
    "parse_modelfile",
]

INT_PARAMS = frozenset({
    "num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
    "main_gpu", "num_thread", "mirostat", "num_gqa",
})
FLOAT_PARAMS = frozenset({
    "top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta",
})
BOOL_PARAMS = frozenset({
    "penalize_newline", "use_mmap", "use_mlock", "numa", "low_vram", "f16_kv", "vocab_only",
    "logits_all", "embedding_only",
})
LIST_PARAMS = frozenset({"stop"})
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_COMMANDS = ("from", "adapter", "parameter", "template", "system", "license", "message")


class ModelfileError(InvalidRequest):
    """A Modelfile that cannot be parsed; the message names the line."""


@dataclass(frozen=True)
class Modelfile:
    """A parsed Modelfile. ``license`` keeps every LICENSE in order; ``parameters`` is typed."""

    from_: str | None = None
    adapters: tuple[str, ...] = ()
    template: str | None = None
    system: str | None = None
    license: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    messages: tuple[Mapping[str, str], ...] = ()


def coerce_parameter(name: str, value: Any) -> Any:
    """Type one parameter value as Ollama does; raises ValueError with a reason."""
    key = name.lower()
    if key in LIST_PARAMS:
        if isinstance(value, list):
            return [str(v) for v in value]
        return [str(value)]
    if key in INT_PARAMS:
        if isinstance(value, bool):
            raise ValueError(f"invalid int value {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"invalid int value {value!r}") from None
    if key in FLOAT_PARAMS:
        if isinstance(value, bool):
            raise ValueError(f"invalid float value {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"invalid float value {value!r}") from None
        if not math.isfinite(number):  # JSON (the params blob, /api/show) has no NaN or infinity
            raise ValueError(f"invalid float value {value!r}: not a finite number")
        return number
    if key in BOOL_PARAMS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "t"):
            return True
        if text in ("false", "0", "f"):
            return False
        raise ValueError(f"invalid bool value {value!r}")
    raise ValueError(f"unknown parameter '{name}'")


def coerce_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """Type a ``parameters`` mapping (from JSON); raises :class:`InvalidRequest`."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        try:
            v = coerce_parameter(name, value)
        except ValueError as e:
            raise InvalidRequest(f"invalid parameter {name!r}: {e}") from None
        key = name.lower()
        if key in LIST_PARAMS and key in out:
            out[key] = [*out[key], *v]
        else:
            out[key] = v
    return out


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text.replace("\r\n", "\n")
        self.i = 0

    def line(self, pos: int | None = None) -> int:
        return self.s.count("\n", 0, self.i if pos is None else pos) + 1

    def fail(self, msg: str, pos: int | None = None) -> ModelfileError:
        return ModelfileError(f"modelfile line {self.line(pos)}: {msg}")

    def skip_spaces(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def word(self) -> str:
        self.skip_spaces()
        start = self.i
        while self.i < len(self.s) and not self.s[self.i].isspace():
            self.i += 1
        return self.s[start:self.i]

    def value(self) -> str:
        self.skip_spaces()
        start = self.i
        for quote in ('"""', '"'):
            if self.s.startswith(quote, self.i):
                end = self.s.find(quote, self.i + len(quote))
                if end < 0:
                    raise self.fail(f"unterminated {quote} string", start)
                text = self.s[self.i + len(quote):end]
                self.i = end + len(quote)
                rest = self.rest_of_line()
                if rest.strip():
                    raise self.fail(f"unexpected text after closing {quote}: {rest.strip()!r}")
                return text
        return self.rest_of_line().strip()

    def rest_of_line(self) -> str:
        end = self.s.find("\n", self.i)
        end = len(self.s) if end < 0 else end
        text = self.s[self.i:end]
        self.i = end
        return text


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text; raises :class:`ModelfileError` naming the offending line."""
    sc = _Scanner(text)
    from_: str | None = None
    adapters: list[str] = []
    template = system = None
    licenses: list[str] = []
    params: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    while sc.i < len(sc.s):
        ch = sc.s[sc.i]
        if ch.isspace():
            sc.i += 1
            continue
        if ch == "#":
            sc.rest_of_line()
            continue
        start = sc.i
        cmd = sc.word().lower()
        if cmd not in _COMMANDS:
            raise sc.fail(
                'command must be one of "from", "license", "template", "system", "adapter", '
                f'"parameter", or "message" (got {cmd!r})', start)
        if cmd == "parameter":
            name = sc.word().lower()
            if not name:
                raise sc.fail("PARAMETER needs a name and a value")
            raw = sc.value()
            if raw == "":
                raise sc.fail(f"PARAMETER {name} needs a value")
            try:
                v = coerce_parameter(name, raw)
            except ValueError as e:
                raise sc.fail(str(e), start) from None
            params[name] = [*params.get(name, []), *v] if name in LIST_PARAMS else v
            continue
        if cmd == "message":
            role = sc.word().lower()
            if role not in MESSAGE_ROLES:
                raise sc.fail(f"invalid message role {role!r}: expected one of {', '.join(MESSAGE_ROLES)}")
            messages.append({"role": role, "content": sc.value()})
            continue
        val = sc.value()
        if cmd in ("from", "adapter") and not val:
            raise sc.fail(f"{cmd.upper()} needs an argument", start)
        if cmd == "from":
            if from_ is not None:
                raise sc.fail("FROM may appear only once", start)
            from_ = val
        elif cmd == "adapter":
            adapters.append(val)
        elif cmd == "template":
            template = val
        elif cmd == "system":
            system = val
        else:
            licenses.append(val)
    if from_ is None:
        raise ModelfileError("no FROM line for the model was specified")
    return Modelfile(from_, tuple(adapters), template, system, tuple(licenses), params, tuple(messages))


def _quote(s: str) -> str:
    # Ollama's rule: quote only when the value spans lines or has edge spaces.
    if "\n" in s or s.startswith(" ") or s.endswith(" ") or s == "":
        return f'"""{s}"""' if '"' in s or "\n" in s else f'"{s}"'
    return s


def _param_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def format_parameters(params: Mapping[str, Any]) -> str:
    """``/api/show`` ``parameters``: one line per value, names padded to 30, strings quoted."""
    lines = []
    for k in sorted(params):
        values = params[k] if isinstance(params[k], list) else [params[k]]
        for v in values:
            shown = json.dumps(v) if isinstance(v, str) else _param_text(v)
            lines.append(f"{k:<30} {shown}")
    return "\n".join(lines)


def format_modelfile(
    *,
    model_path: str,
    short_name: str,
    template: str | None = None,
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    adapter_paths: Sequence[str] = (),
    license: Sequence[str] = (),
    messages: Sequence[Mapping[str, str]] = (),
) -> str:
    """The ``modelfile`` text of ``/api/show``, laid out as Ollama's."""
    out = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {short_name}",
        "",
        f"FROM {model_path}",
    ]
    out += [f"ADAPTER {_quote(a)}" for a in adapter_paths]
    if template:
        out.append(f"TEMPLATE {_quote(template)}")
    if system:
        out.append(f"SYSTEM {_quote(system)}")
    for k in sorted(parameters or {}):
        v = (parameters or {})[k]
        for item in v if isinstance(v, list) else [v]:
            out.append(f"PARAMETER {k} {_quote(_param_text(item))}")
    out += [f"LICENSE {_quote(text)}" for text in license]
    out += [f"MESSAGE {m['role']} {_quote(m.get('content', ''))}" for m in messages]
    return "\n".join(out) + "\n"
