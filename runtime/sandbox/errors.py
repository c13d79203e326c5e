"""The errors of the sandbox, each an :class:`~omx.errors.OmxError` with its HTTP status."""

from __future__ import annotations

from omx.errors import InvalidRequest, OmxError

__all__ = ["DeployError", "FunctionError", "SandboxUnavailable"]


class SandboxUnavailable(OmxError, RuntimeError):
    """This machine cannot run sandboxed workers; ``str()`` says why (503: custom functions are off here)."""

    status = 503


class DeployError(InvalidRequest, ValueError):
    """A function file that does not load: a syntax or import error, bad decorator arguments, no handlers.

    ``line`` is the line of the file at fault, when there is one.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"{message} (line {line})")
        self.line = line


class FunctionError(OmxError):
    """A call that failed: 400 (the body does not validate), 429 (over concurrency after a brief wait),
    500 (the function raised), 502 (the worker crashed or ran out of memory: the message names the limit),
    503 (the function's pool is closed), 504 (past the timeout: the worker was killed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)
