"""Deploy-time validation: import a function file in a sandboxed worker and list its functions."""

from __future__ import annotations

from omx.functions.sdk import FunctionSpec
from omx.runtime.sandbox._bwrap import Limits, next_uid, sandbox_problem_async
from omx.runtime.sandbox._process import WorkerProcess
from omx.runtime.sandbox._wire import ProtocolError
from omx.runtime.sandbox.errors import DeployError, SandboxUnavailable

__all__ = ["INSPECT_LIMITS", "inspect_source"]

INSPECT_LIMITS = Limits(memory_mb=1024, cpu_s=20)
"""What importing a file may take; its own functions' limits apply only when they are called."""
INSPECT_TIMEOUT_S = 20.0


async def inspect_source(filename: str, source: str) -> list[FunctionSpec]:
    """The functions ``source`` defines, found by importing it in a sandbox.

    Raises :class:`DeployError` (with the line, when there is one) for a syntax
    or import error, bad decorator arguments, or a file without functions;
    :class:`SandboxUnavailable` when no sandbox can run here.
    """
    problem = await sandbox_problem_async()
    if problem is not None:
        raise SandboxUnavailable(problem)
    lines: list[str] = []
    limits = Limits(memory_mb=INSPECT_LIMITS.memory_mb, cpu_s=INSPECT_LIMITS.cpu_s, uid=next_uid())
    load = {"filename": filename, "source": source, "qualname": None, "node": ""}
    try:
        worker, frame = await WorkerProcess.start(limits, load, on_line=lines.append, load_s=INSPECT_TIMEOUT_S)
    except ProtocolError as exc:
        raise DeployError(f"{filename} does not import: {exc}") from None
    await worker.kill()
    if frame[0] == "fatal":
        line = frame[3] if isinstance(frame[3], int) else None
        raise DeployError(str(frame[2]), line)
    try:
        return [FunctionSpec.from_json(spec) for spec in frame[2]]
    except (TypeError, ValueError) as exc:
        raise DeployError(f"{filename} declares a function badly: {exc}") from None
