"""The function host's view of the sandbox (:mod:`omx.runtime.sandbox`), with its errors as HTTP errors.

``DeployError`` becomes 400 naming the line, ``FunctionError`` its own status,
``SandboxUnavailable`` (and any call while :func:`sandbox_problem` names a
reason) 503 with that reason: a node never runs custom code unsandboxed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from omx.errors import InvalidRequest, OmxError
from omx.functions.custom_view import Invocation
from omx.functions.sdk import FunctionSpec
from omx.runtime import sandbox as _sandbox
from omx.runtime.functions_host.serving import Pool

__all__ = ["Sandbox"]


def _unavailable(reason: str) -> OmxError:
    return OmxError(f"custom functions are disabled on this node: {reason}", status=503)


def function_error(exc: Any) -> OmxError:
    """A sandbox ``FunctionError`` as the error its caller gets."""
    status, message = int(getattr(exc, "status", 502)), str(getattr(exc, "message", exc))
    return OmxError(message, status=status)


class Sandbox:
    """Inspection, pools and calls through the real sandbox; ``host`` is the pools' ``ContextHost``."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self._problem: str | None = None
        self._checked = False

    async def check(self) -> str | None:
        """Find out (once, in a thread: it starts a trial sandbox) whether sandboxed workers can run here."""
        if not self._checked:
            self._problem = await asyncio.to_thread(_sandbox.sandbox_problem)
            self._checked = True
        return self._problem

    def problem(self) -> str | None:
        return self._problem if self._checked else "the sandbox has not been checked yet"

    def require(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise _unavailable(problem)

    async def inspect(self, filename: str, source: str) -> list[dict[str, Any]]:
        """The specs of the functions ``source`` defines (imported in a sandboxed worker)."""
        try:
            specs = await _sandbox.inspect_source(filename, source)
        except _sandbox.DeployError as exc:  # its message names the line when there is one
            raise InvalidRequest(f"{filename}: {exc.message}") from exc
        except _sandbox.SandboxUnavailable as exc:
            raise _unavailable(str(exc)) from exc
        return [spec.to_json() for spec in specs]

    def pool(self, filename: str, source: str, spec: Mapping[str, Any]) -> Pool:
        return _sandbox.FunctionPool(filename=filename, source=source, spec=FunctionSpec.from_json(spec),
                                     host=self._host)

    async def call(self, pool: Pool, body: Any, headers: Mapping[str, str]) -> Invocation:
        try:
            result = await pool.call(body, headers)
        except _sandbox.FunctionError as exc:
            raise function_error(exc) from exc
        except _sandbox.SandboxUnavailable as exc:
            raise _unavailable(str(exc)) from exc
        if result.stream is None:
            return Invocation(value=result.value)
        return Invocation(stream=_translated(result.stream))


async def _translated(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for item in stream:
            yield item
    except _sandbox.FunctionError as exc:
        raise function_error(exc) from exc
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
