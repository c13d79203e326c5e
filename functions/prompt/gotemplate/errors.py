"""Errors raised while parsing or executing a Go template.

A template that does not parse is bad input (HTTP 400, as Ollama answers at
create time); a template that fails while rendering is a server-side failure
(HTTP 500, as Ollama answers at chat time).
"""

from __future__ import annotations

from omx.errors import InvalidRequest, OmxError

__all__ = ["TemplateError", "TemplateExecutionError", "line_col"]


def line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset`` in ``text``."""
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


class TemplateError(InvalidRequest):
    """The template text is not a valid Go template (or uses what is unsupported)."""

    def __init__(self, message: str, *, line: int = 0, col: int = 0) -> None:
        where = f"{line}:{col}: " if line else ""
        super().__init__(f"template: {where}{message}")
        self.line = line
        self.col = col
        self.reason = message


class TemplateExecutionError(OmxError):
    """Rendering failed (bad field, bad function argument, index out of range…)."""

    status = 500

    def __init__(self, message: str, *, line: int = 0, col: int = 0, node: str = "") -> None:
        where = f"{line}:{col}: " if line else ""
        at = f"executing at <{node}>: " if node else ""
        super().__init__(f"template: {where}{at}{message}")
        self.line = line
        self.col = col
        self.reason = message
