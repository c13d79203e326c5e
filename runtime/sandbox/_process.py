"""One sandboxed worker process, seen from the node: start it, talk to it, kill it, say how it ended."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
from collections.abc import Callable
from typing import Any

from omx.runtime.sandbox._bwrap import Limits, sandbox_command, worker_env
from omx.runtime.sandbox._wire import MAX_FRAME, ProtocolError, encode, read_frame

__all__ = ["WorkerProcess"]

_STDERR_TAIL = 30
_STDERR_SETTLE_S = 1.0
_MEMORY_WORDS = ("MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc")


class WorkerProcess:
    """A worker started with :meth:`start`; ``ready`` holds the specs its ``ready`` frame listed."""

    def __init__(self, proc: asyncio.subprocess.Process, on_line: Callable[[str], None]) -> None:
        self.proc = proc
        self.ready: list[Any] = []
        self.cpu_s = 0.0
        self.idle_since = 0.0
        self._tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._on_line = on_line
        assert proc.stderr is not None and proc.stdout is not None and proc.stdin is not None
        self._stdout = proc.stdout
        self._stdin = proc.stdin
        self._stderr_task = asyncio.create_task(self._drain(proc.stderr))

    @classmethod
    async def start(cls, limits: Limits, load: dict[str, Any], *, on_line: Callable[[str], None],
                    load_s: float) -> tuple[WorkerProcess, list[Any]]:
        """Start a worker and send it ``load``; returns it and its first frame ("ready" or "fatal").

        Raises :class:`ProtocolError` when it ends or says nothing sensible within ``load_s``.
        """
        proc = await asyncio.create_subprocess_exec(
            *sandbox_command(limits), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=worker_env(), limit=MAX_FRAME)
        worker = cls(proc, on_line)
        try:
            worker.send(["load", load])
            async with asyncio.timeout(load_s):
                frame = await worker.read()
            if frame is None or frame[0] not in ("ready", "fatal"):
                raise ProtocolError(await worker.ended("the worker ended before it loaded the file"))
        except TimeoutError:
            await worker.kill()
            raise ProtocolError(f"the worker did not load the file within {load_s:g} s") from None
        except BaseException:
            await worker.kill()
            raise
        if frame[0] == "ready":
            worker.ready = list(frame[2]) if isinstance(frame[2], list) else []
        return worker, frame

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self._stdin.is_closing()

    def send(self, frame: list[Any]) -> None:
        if self._stdin.is_closing():
            raise ProtocolError("the worker's pipe is closed")
        self._stdin.write(encode(frame))

    async def read(self) -> list[Any] | None:
        return await read_frame(self._stdout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # bubblewrap dies; --die-with-parent takes the whole sandbox with it
        await self.proc.wait()
        self._stdin.close()
        await self._settle()

    async def ended(self, what: str) -> str:
        """Why the worker's output ended: its exit status and the last thing it said, after ``what``."""
        code: int | None
        try:
            async with asyncio.timeout(_STDERR_SETTLE_S):
                code = await self.proc.wait()
        except TimeoutError:
            await self.kill()
            code = self.proc.returncode
        await self._settle()
        return f"{what} ({_exit_text(code)}){self._last_words()}"

    def ran_out_of_memory(self) -> bool:
        return any(word in line for line in self._tail for word in _MEMORY_WORDS)

    def _last_words(self) -> str:
        lines = [line.strip() for line in self._tail if line.strip() and not line.startswith((" ", "\t"))]
        said = [line for line in lines if "rror" in line] or lines  # "Fatal Python error: ...", "MemoryError"
        return f": {said[-1][:300]}" if said else ""

    async def _settle(self) -> None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(_STDERR_SETTLE_S):
                await asyncio.shield(self._stderr_task)
        if not self._stderr_task.done():
            self._stderr_task.cancel()

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # a line over the limit: its pieces are dropped
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail.append(line)
            with contextlib.suppress(Exception):
                self._on_line(line)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    # bubblewrap reports a worker killed by signal N as 128 + N; asyncio reports its own death as -N.
    number = -code if code < 0 else code - 128 if code > 128 else 0
    if number:
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit status {code}"
