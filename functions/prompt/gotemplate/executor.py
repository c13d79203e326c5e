"""Executes a parsed Go template, following ``text/template/exec.go``.

Variables live on one stack: control structures mark it and pop back at their
``{{end}}``, ``range`` pops after each iteration, ``$x = v`` assigns the
innermost ``$x``. Field access: a mapping yields its key, or nil when the key
is missing (``missingkey=zero`` on an interface map, printed ``<no value>``);
a struct (dataclass) yields its field, and an unknown field is an execution
error as in Go; a field of nil is nil.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import nodes as n
from .errors import TemplateExecutionError, line_col
from .funcs import ARITY, FuncError
from .values import go_print, go_type_name, is_struct, is_true, sort_key

__all__ = ["execute"]

_Func = Callable[..., Any]


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _State:
    def __init__(self, source: str, funcs: Mapping[str, _Func], arity: Mapping[str, tuple[int, int | None]]):
        self.source = source
        self.funcs = funcs
        self.arity = arity
        self.vars: list[list[Any]] = []  # [name, value] pairs, innermost last
        self.out: list[str] = []

    # --- errors and variables ---------------------------------------------------
    def fail(self, node: n.Node, message: str) -> TemplateExecutionError:
        line, col = line_col(self.source, node.pos)
        return TemplateExecutionError(message, line=line, col=col, node=str(node))

    def push(self, name: str, value: object) -> None:
        self.vars.append([name, value])

    def pop_to(self, mark: int) -> None:
        del self.vars[mark:]

    def set_var(self, node: n.Node, name: str, value: object) -> None:
        for pair in reversed(self.vars):
            if pair[0] == name:
                pair[1] = value
                return
        raise self.fail(node, f"undefined variable: {name}")

    def var_value(self, node: n.Node, name: str) -> object:
        for pair in reversed(self.vars):
            if pair[0] == name:
                return pair[1]
        raise self.fail(node, f"undefined variable: {name}")

    # --- walking -----------------------------------------------------------------
    def walk(self, dot: object, node: n.Node) -> None:
        if isinstance(node, n.TextNode):
            self.out.append(node.text)
        elif isinstance(node, n.ActionNode):
            value = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.out.append(go_print(value))
        elif isinstance(node, n.ListNode):
            for child in node.nodes:
                self.walk(dot, child)
        elif isinstance(node, n.BranchNode):
            if node.kind == "range":
                self.walk_range(dot, node)
            else:
                self.walk_if_or_with(dot, node)
        elif isinstance(node, n.BreakNode):
            raise _Break
        elif isinstance(node, n.ContinueNode):
            raise _Continue
        else:
            raise self.fail(node, f"unknown node: {type(node).__name__}")

    def walk_if_or_with(self, dot: object, node: n.BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            if is_true(value):
                self.walk(value if node.kind == "with" else dot, node.list)
            elif node.else_list is not None:
                self.walk(dot, node.else_list)
        finally:
            self.pop_to(mark)

    def walk_range(self, dot: object, node: n.BranchNode) -> None:
        mark = len(self.vars)
        try:
            value = self.eval_pipeline(dot, node.pipe)
            body_mark = len(self.vars)
            pairs = self.range_pairs(node, value)
            if not pairs:
                if node.else_list is not None:
                    self.walk(dot, node.else_list)
                return
            decl = node.pipe.decl
            for index, elem in pairs:
                if decl:
                    if node.pipe.is_assign:
                        self.set_var(node, decl[0], index if len(decl) > 1 else elem)
                        if len(decl) > 1:
                            self.set_var(node, decl[1], elem)
                    else:
                        # evalPipeline pushed the declared names; the last one is the element.
                        self.vars[body_mark - 1][1] = elem
                        if len(decl) > 1:
                            self.vars[body_mark - 2][1] = index
                try:
                    self.walk(elem, node.list)
                except _Continue:
                    pass
                except _Break:
                    break
                finally:
                    self.pop_to(body_mark)
        finally:
            self.pop_to(mark)

    def range_pairs(self, node: n.BranchNode, value: object) -> list[tuple[object, object]]:
        if value is None:
            return []
        if isinstance(value, Mapping):
            keys = sorted(value, key=sort_key)
            return [(k, value[k]) for k in keys]
        if isinstance(value, (list, tuple)):
            return list(enumerate(value))
        if isinstance(value, int) and not isinstance(value, bool):
            if len(node.pipe.decl) > 1:
                raise self.fail(node, "can't use integer with two range variables")
            return [(i, i) for i in range(value)]
        raise self.fail(node, f"range can't iterate over {go_print(value)}")

    # --- evaluation ----------------------------------------------------------------
    def eval_pipeline(self, dot: object, pipe: n.PipeNode) -> object:
        value: object = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
        for name in pipe.decl:
            if pipe.is_assign:
                self.set_var(pipe, name, value)
            else:
                self.push(name, value)
        return value

    def eval_command(self, dot: object, cmd: n.CommandNode, final: object) -> object:
        first = cmd.args[0]
        if isinstance(first, n.IdentifierNode):
            return self.eval_function(dot, first, cmd, final)
        if len(cmd.args) > 1 or final is not _MISSING:
            raise self.fail(first, f"can't give argument to non-function {first}")
        return self.eval_arg(dot, first)

    def eval_arg(self, dot: object, node: n.Node) -> object:
        if isinstance(node, n.DotNode):
            return dot
        if isinstance(node, n.NilNode):
            return None
        if isinstance(node, n.FieldNode):
            return self.eval_fields(node, dot, node.ident)
        if isinstance(node, n.VariableNode):
            return self.eval_fields(node, self.var_value(node, node.ident[0]), node.ident[1:])
        if isinstance(node, n.ChainNode):
            return self.eval_fields(node, self.eval_arg(dot, node.node), node.fields)
        if isinstance(node, n.PipeNode):
            return self.eval_pipeline(dot, node)
        if isinstance(node, (n.BoolNode, n.NumberNode, n.StringNode)):
            return node.value
        if isinstance(node, n.IdentifierNode):
            return self.eval_function(dot, node, n.CommandNode(node.pos, (node,)), _MISSING)
        raise self.fail(node, f"can't handle {node} as an argument")

    def eval_fields(self, node: n.Node, receiver: object, names: tuple[str, ...]) -> object:
        for name in names:
            receiver = self.field(node, receiver, name)
        return receiver

    def field(self, node: n.Node, receiver: object, name: str) -> object:
        if receiver is None:
            return None
        if isinstance(receiver, Mapping):
            return receiver.get(name)
        if is_struct(receiver):
            if name in _field_names(type(receiver)):
                return getattr(receiver, name)
            raise self.fail(node, f"can't evaluate field {name} in type {go_type_name(receiver)}")
        raise self.fail(node, f"can't evaluate field {name} in type {go_type_name(receiver)}")

    def eval_function(self, dot: object, ident: n.IdentifierNode, cmd: n.CommandNode, final: object) -> object:
        name = ident.name
        fn = self.funcs.get(name)
        if fn is None:
            raise self.fail(ident, f'"{name}" is not a defined function')
        arg_nodes = cmd.args[1:]
        count = len(arg_nodes) + (final is not _MISSING)
        low, high = self.arity.get(name, (0, None))
        if count < low or (high is not None and count > high):
            want = f"at least {low}" if high is None else str(low) if low == high else f"{low} to {high}"
            raise self.fail(ident, f"wrong number of args for {name}: want {want} got {count}")
        if name in ("and", "or"):
            return self.short_circuit(dot, name == "and", arg_nodes, final)
        args = [self.eval_arg(dot, a) for a in arg_nodes]
        if final is not _MISSING:
            args.append(final)
        try:
            return fn(*args)
        except FuncError as exc:
            raise self.fail(ident, f"error calling {name}: {exc}") from None
        except TemplateExecutionError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.fail(ident, f"error calling {name}: {exc}") from None

    def short_circuit(self, dot: object, is_and: bool, arg_nodes: tuple[n.Node, ...], final: object) -> object:
        values: list[object] = []
        for node in arg_nodes:
            value = self.eval_arg(dot, node)
            if is_true(value) != is_and:
                return value
            values.append(value)
        if final is not _MISSING:
            return final
        return values[-1]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
_FIELDS_CACHE: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELDS_CACHE.get(cls)
    if names is None:
        names = frozenset(f for f in getattr(cls, "__dataclass_fields__", {}))
        _FIELDS_CACHE[cls] = names
    return names


def execute(
    tree: n.ListNode,
    data: object,
    *,
    source: str,
    funcs: Mapping[str, _Func],
    arity: Mapping[str, tuple[int, int | None]] = ARITY,
) -> str:
    """Render ``tree`` with ``data`` as dot and ``$``; raises :class:`TemplateExecutionError`."""
    state = _State(source, funcs, arity)
    state.push("$", data)
    state.walk(data, tree)
    return "".join(state.out)
