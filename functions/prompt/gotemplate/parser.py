"""Parser for Go templates, following ``text/template/parse/parse.go``.

Checks at parse time what Go checks: functions must be defined, variables
declared in scope, ``break``/``continue`` inside ``range``, the first command
of a pipeline stage after ``|`` executable. ``define``, ``template`` and
``block`` (named sub-templates) are not supported and are rejected.
"""

from __future__ import annotations

from collections.abc import Collection

from . import nodes as n
from .errors import TemplateError, line_col
from .lexer import Item, Kind, lex
from .strings import parse_number, unquote

__all__ = ["parse_tree"]

_NON_EXECUTABLE = (n.BoolNode, n.DotNode, n.NilNode, n.NumberNode, n.StringNode)


class _End(Exception):
    """Internal: an ``{{end}}`` or ``{{else}}`` closed the current list."""


class _Parser:
    def __init__(self, text: str, funcs: Collection[str]) -> None:
        self.text = text
        self.items = lex(text)
        self.i = 0
        self.funcs = funcs
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.else_chain: str | None = None

    # --- token stream -------------------------------------------------------------
    def fail(self, message: str, pos: int) -> TemplateError:
        line, col = line_col(self.text, pos)
        return TemplateError(message, line=line, col=col)

    def next(self) -> Item:
        item = self.items[self.i]
        self.i += 1
        return item

    def backup(self, count: int = 1) -> None:
        self.i -= count

    def peek(self) -> Item:
        return self.items[self.i]

    def next_non_space(self) -> Item:
        item = self.next()
        while item.kind is Kind.SPACE:
            item = self.next()
        return item

    def peek_non_space(self) -> Item:
        item = self.next_non_space()
        self.backup()
        return item

    def unexpected(self, item: Item, context: str) -> TemplateError:
        shown = "EOF" if item.kind is Kind.EOF else repr(item.value)
        return self.fail(f"unexpected {shown} in {context}", item.pos)

    # --- structure ----------------------------------------------------------------
    def parse(self) -> n.ListNode:
        nodes: list[n.Node] = []
        while self.peek().kind is not Kind.EOF:
            node, stop = self.text_or_action()
            if stop is not None:
                raise self.fail(f"unexpected {{{{{stop}}}}}", node.pos)
            nodes.append(node)
        return n.ListNode(0, tuple(nodes))

    def text_or_action(self) -> tuple[n.Node, str | None]:
        """One text or action; the second value names a closing ``end``/``else``."""
        item = self.next_non_space()
        if item.kind is Kind.TEXT:
            return n.TextNode(item.pos, item.value), None
        if item.kind is Kind.LEFT_DELIM:
            return self.action(item)
        raise self.unexpected(item, "input")

    def item_list(self, context: str) -> tuple[n.ListNode, str, int]:
        """Nodes up to ``{{end}}`` or ``{{else}}``; returns the list and which closed it."""
        start = self.peek().pos
        nodes: list[n.Node] = []
        while self.peek().kind is not Kind.EOF:
            node, stop = self.text_or_action()
            if stop is not None:
                return n.ListNode(start, tuple(nodes)), stop, node.pos
            nodes.append(node)
        raise self.fail(f"unexpected EOF in {context}", self.peek().pos)

    def action(self, delim: Item) -> tuple[n.Node, str | None]:
        item = self.next_non_space()
        if item.kind is Kind.KEYWORD:
            word = item.value
            if word in ("if", "range", "with"):
                return self.control(word, item.pos), None
            if word == "end":
                self.expect_right(item, "end")
                return n.TextNode(item.pos, ""), "end"
            if word == "else":
                return self.else_action(item)
            if word in ("break", "continue"):
                if self.range_depth == 0:
                    raise self.fail(f"{{{{{word}}}}} outside {{{{range}}}}", item.pos)
                self.expect_right(item, word)
                cls = n.BreakNode if word == "break" else n.ContinueNode
                return cls(item.pos), None
            raise self.fail(f"{{{{{word}}}}} (named templates) is not supported", item.pos)
        self.backup()
        return n.ActionNode(delim.pos, self.pipeline("command", Kind.RIGHT_DELIM)), None

    def expect_right(self, after: Item, context: str) -> None:
        item = self.next_non_space()
        if item.kind is not Kind.RIGHT_DELIM:
            raise self.unexpected(item, context)

    def else_action(self, item: Item) -> tuple[n.Node, str | None]:
        nxt = self.peek_non_space()
        if nxt.kind is Kind.KEYWORD and nxt.value in ("if", "with"):
            # "{{else if x}}" is "{{else}}{{if x}}…{{end}}" sharing the outer {{end}};
            # the keyword stays pending for control() to consume.
            self.else_chain = nxt.value
            return n.TextNode(item.pos, ""), "else"
        self.expect_right(item, "else")
        self.else_chain = None
        return n.TextNode(item.pos, ""), "else"

    def control(self, kind: str, pos: int) -> n.BranchNode:
        mark = len(self.vars)
        try:
            pipe = self.pipeline(kind, Kind.RIGHT_DELIM)
            self.range_depth += kind == "range"
            try:
                body, stop, stop_pos = self.item_list(kind)
            finally:
                self.range_depth -= kind == "range"
            else_list: n.ListNode | None = None
            if stop == "else":
                chain, self.else_chain = self.else_chain, None
                if chain is not None:
                    keyword = self.next_non_space()
                    if chain != kind or kind == "range":
                        raise self.unexpected(keyword, "input")
                    inner = self.control(chain, keyword.pos)
                    return n.BranchNode(pos, kind, pipe, body, n.ListNode(stop_pos, (inner,)))
                else_list, stop, stop_pos = self.item_list(kind)
                if stop != "end":
                    raise self.fail("expected end; found {{else}}", stop_pos)
            return n.BranchNode(pos, kind, pipe, body, else_list)
        finally:
            del self.vars[mark:]

    # --- pipelines ------------------------------------------------------------------
    def pipeline(self, context: str, end: Kind) -> n.PipeNode:
        start = self.peek_non_space().pos
        decl: list[str] = []
        is_assign = False
        while True:
            save = self.i
            v = self.next_non_space()
            if v.kind is not Kind.VARIABLE:
                self.i = save
                break
            nxt = self.peek_non_space()
            if nxt.kind in (Kind.ASSIGN, Kind.DECLARE):
                is_assign = nxt.kind is Kind.ASSIGN
                self.next_non_space()
                decl.append(v.value)
                self.vars.append(v.value)
                break
            if nxt.kind is Kind.CHAR and nxt.value == ",":
                self.next_non_space()
                decl.append(v.value)
                self.vars.append(v.value)
                if context == "range" and len(decl) < 2:
                    if self.peek_non_space().kind in (Kind.VARIABLE, Kind.RIGHT_DELIM, Kind.RPAREN):
                        continue
                    raise self.fail("range can only initialize variables", nxt.pos)
                raise self.fail(f"too many declarations in {context}", nxt.pos)
            # "$x foo": $x is an argument, not a declaration.
            self.i = save
            break
        cmds: list[n.CommandNode] = []
        while True:
            item = self.next_non_space()
            if item.kind is end:
                self.check_pipeline(cmds, context, item.pos)
                return n.PipeNode(start, is_assign, tuple(decl), tuple(cmds))
            if item.kind in (
                Kind.BOOL, Kind.CHAR_CONSTANT, Kind.DOT, Kind.FIELD, Kind.IDENTIFIER, Kind.NUMBER,
                Kind.NIL, Kind.RAW_STRING, Kind.STRING, Kind.VARIABLE, Kind.LPAREN,
            ):  # fmt: skip
                self.backup()
                cmds.append(self.command())
            else:
                raise self.unexpected(item, context)

    def check_pipeline(self, cmds: list[n.CommandNode], context: str, pos: int) -> None:
        if not cmds:
            raise self.fail(f"missing value for {context}", pos)
        for stage, cmd in enumerate(cmds[1:], start=2):
            if isinstance(cmd.args[0], _NON_EXECUTABLE):
                raise self.fail(f"non executable command in pipeline stage {stage}", cmd.pos)

    def command(self) -> n.CommandNode:
        start = self.peek_non_space().pos
        args: list[n.Node] = []
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                args.append(operand)
            item = self.next()
            if item.kind is Kind.SPACE:
                continue
            if item.kind in (Kind.RIGHT_DELIM, Kind.RPAREN):
                self.backup()
            elif item.kind is not Kind.PIPE:
                raise self.unexpected(item, "operand")
            break
        if not args:
            raise self.fail("empty command", start)
        return n.CommandNode(start, tuple(args))

    def operand(self) -> n.Node | None:
        node = self.term()
        if node is None or self.peek().kind is not Kind.FIELD:
            return node
        fields: list[str] = []
        while self.peek().kind is Kind.FIELD:
            fields.append(self.next().value[1:])
        if isinstance(node, n.FieldNode):
            return n.FieldNode(node.pos, node.ident + tuple(fields))
        if isinstance(node, n.VariableNode):
            return n.VariableNode(node.pos, node.ident + tuple(fields))
        if isinstance(node, _NON_EXECUTABLE):
            raise self.fail(f"unexpected . after term {str(node)!r}", node.pos)
        return n.ChainNode(node.pos, node, tuple(fields))

    def term(self) -> n.Node | None:
        item = self.next_non_space()
        k, v, pos = item.kind, item.value, item.pos
        if k is Kind.IDENTIFIER:
            if v not in self.funcs:
                raise self.fail(f'function "{v}" not defined', pos)
            return n.IdentifierNode(pos, v)
        if k is Kind.DOT:
            return n.DotNode(pos)
        if k is Kind.NIL:
            return n.NilNode(pos)
        if k is Kind.VARIABLE:
            name = v.split(".")[0]
            if name not in self.vars:
                raise self.fail(f'undefined variable "{name}"', pos)
            return n.VariableNode(pos, (v,))
        if k is Kind.FIELD:
            return n.FieldNode(pos, (v[1:],))
        if k is Kind.BOOL:
            return n.BoolNode(pos, v == "true")
        if k in (Kind.NUMBER, Kind.CHAR_CONSTANT):
            try:
                return n.NumberNode(pos, parse_number(v), v)
            except ValueError as exc:
                raise self.fail(str(exc), pos) from None
        if k is Kind.LPAREN:
            return self.pipeline("parenthesized pipeline", Kind.RPAREN)
        if k in (Kind.STRING, Kind.RAW_STRING):
            try:
                return n.StringNode(pos, unquote(v), v)
            except ValueError as exc:
                raise self.fail(str(exc), pos) from None
        self.backup()
        return None


def parse_tree(text: str, funcs: Collection[str]) -> n.ListNode:
    """Parse ``text`` into a tree; ``funcs`` names the functions templates may call."""
    return _Parser(text, funcs).parse()
