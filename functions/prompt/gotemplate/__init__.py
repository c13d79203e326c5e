"""A faithful subset of Go's ``text/template``, enough for Ollama's model templates.

Supported: actions with pipelines (``|``) and parenthesised sub-pipelines;
``.Field`` chains, ``$``, ``$x.Field``, ``(expr).Field``; variables
(``$x := …``, ``$x = …``, ``range $i, $e := …``); ``if``/``else if``/``else``,
``with``/``else with``/``else``, ``range``/``else`` over slices, maps (sorted
keys) and integers, with ``break``/``continue``; trim markers ``{{- `` and
`` -}}``; comments; string (interpreted and raw), char, number, bool and nil
literals; Go's predefined functions except ``html``, ``js``, ``urlquery`` and
``call``; extra functions supplied by the caller.

Not supported: ``define``/``template``/``block`` (rejected at parse time) and
calling methods of values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import nodes
from .errors import TemplateError, TemplateExecutionError
from .executor import execute
from .funcs import ARITY, BUILTINS, sprintf
from .parser import parse_tree
from .values import JsonObject, go_json, go_print, is_true

__all__ = [
    "JsonObject",
    "Template",
    "TemplateError",
    "TemplateExecutionError",
    "go_json",
    "go_print",
    "is_true",
    "nodes",
    "parse",
    "sprintf",
]

Func = Callable[..., Any]


@dataclass(frozen=True)
class Template:
    """A parsed template: its source, tree, and the functions it may call."""

    source: str
    root: nodes.ListNode
    funcs: Mapping[str, Func] = field(repr=False)
    arity: Mapping[str, tuple[int, int | None]] = field(repr=False)

    def execute(self, data: object, *, funcs: Mapping[str, Func] | None = None) -> str:
        """Render with ``data`` as dot; ``funcs`` rebinds already-declared functions for this call.

        Raises :class:`TemplateExecutionError`.
        """
        bound = {**self.funcs, **funcs} if funcs else self.funcs
        return execute(self.root, data, source=self.source, funcs=bound, arity=self.arity)

    def with_root(self, root: nodes.ListNode) -> Template:
        """The same template over another tree (for tree rewrites)."""
        return Template(self.source, root, self.funcs, self.arity)


def parse(
    source: str,
    funcs: Mapping[str, Func] | None = None,
    arity: Mapping[str, tuple[int, int | None]] | None = None,
) -> Template:
    """Parse ``source``; ``funcs`` adds functions (``arity`` their (min, max) arg counts).

    Raises :class:`TemplateError` (HTTP 400) with line and column on bad syntax.
    """
    all_funcs: dict[str, Func] = {**BUILTINS, **(funcs or {})}
    all_arity: dict[str, tuple[int, int | None]] = {**ARITY, **(arity or {})}
    root = parse_tree(source, all_funcs.keys())
    return Template(source, root, all_funcs, all_arity)
