"""The parse tree of a Go template, mirroring ``text/template/parse/node.go``.

Nodes are frozen; ``pos`` is the character offset of the node in the source,
used for error positions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ActionNode",
    "BoolNode",
    "BranchNode",
    "BreakNode",
    "ChainNode",
    "CommandNode",
    "ContinueNode",
    "DotNode",
    "FieldNode",
    "IdentifierNode",
    "ListNode",
    "NilNode",
    "Node",
    "NumberNode",
    "PipeNode",
    "StringNode",
    "TextNode",
    "VariableNode",
]


@dataclass(frozen=True, slots=True)
class Node:
    pos: int


@dataclass(frozen=True, slots=True)
class TextNode(Node):
    text: str


@dataclass(frozen=True, slots=True)
class FieldNode(Node):
    """``.A.B`` — ``ident`` is ``("A", "B")``."""

    ident: tuple[str, ...]

    def __str__(self) -> str:
        return "".join("." + i for i in self.ident)


@dataclass(frozen=True, slots=True)
class VariableNode(Node):
    """``$x.A`` — ``ident`` is ``("$x", "A")``; ``$`` alone is ``("$",)``."""

    ident: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.ident)


@dataclass(frozen=True, slots=True)
class ChainNode(Node):
    """A term followed by field accesses: ``(index .M 0).Name``."""

    node: Node
    fields: tuple[str, ...]

    def __str__(self) -> str:
        inner = f"({self.node})" if isinstance(self.node, PipeNode) else str(self.node)
        return inner + "".join("." + f for f in self.fields)


@dataclass(frozen=True, slots=True)
class IdentifierNode(Node):
    """A function name."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class DotNode(Node):
    def __str__(self) -> str:
        return "."


@dataclass(frozen=True, slots=True)
class NilNode(Node):
    def __str__(self) -> str:
        return "nil"


@dataclass(frozen=True, slots=True)
class BoolNode(Node):
    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True, slots=True)
class NumberNode(Node):
    value: int | float
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class StringNode(Node):
    value: str
    quoted: str

    def __str__(self) -> str:
        return self.quoted


@dataclass(frozen=True, slots=True)
class CommandNode(Node):
    args: tuple[Node, ...]

    def __str__(self) -> str:
        return " ".join(f"({a})" if isinstance(a, PipeNode) else str(a) for a in self.args)


@dataclass(frozen=True, slots=True)
class PipeNode(Node):
    """``$x := a | b c``: declared variables, then commands joined by ``|``."""

    is_assign: bool
    decl: tuple[str, ...]
    cmds: tuple[CommandNode, ...]

    def __str__(self) -> str:
        head = ""
        if self.decl:
            head = ", ".join(self.decl) + (" = " if self.is_assign else " := ")
        return head + " | ".join(str(c) for c in self.cmds)


@dataclass(frozen=True, slots=True)
class ActionNode(Node):
    pipe: PipeNode

    def __str__(self) -> str:
        return "{{" + str(self.pipe) + "}}"


@dataclass(frozen=True, slots=True)
class ListNode(Node):
    nodes: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class BranchNode(Node):
    """``if``, ``range`` or ``with`` (``kind``); ``else_list`` is None without ``{{else}}``."""

    kind: str
    pipe: PipeNode
    list: ListNode
    else_list: ListNode | None


@dataclass(frozen=True, slots=True)
class BreakNode(Node):
    pass


@dataclass(frozen=True, slots=True)
class ContinueNode(Node):
    pass
