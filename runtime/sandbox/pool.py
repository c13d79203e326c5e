"""A pool of warm sandboxed workers for one deployed function version.

Each call takes a concurrency slot (waiting up to ``queue_wait_s`` for one,
else 429), then an idle worker (the most recently used) or a new one, and
sends it the body. While the function runs, its ``ctx.generate`` / ``chat`` /
``embed`` calls come back over the pipe and are answered through the
:class:`ContextHost`; ``ctx.log`` lines and whatever the worker prints go to
``host.log``. Past the timeout the worker is killed (504); a worker that dies
mid-call is a 502 (naming the memory limit when it ran out of memory), and a
fresh one is started in the background. Workers idle for ``idle_s`` are
stopped, down to none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from omx.functions.sdk import FunctionSpec
from omx.runtime.sandbox._bwrap import Limits, next_uid, sandbox_problem_async
from omx.runtime.sandbox._process import WorkerProcess
from omx.runtime.sandbox._wire import ProtocolError
from omx.runtime.sandbox.errors import FunctionError, SandboxUnavailable

__all__ = ["CallResult", "ContextHost", "FunctionPool", "filter_headers"]

QUEUE_WAIT_S = 1.0
IDLE_S = 300.0
START_TIMEOUT_S = 30.0
_NPROC = 32
_HIDDEN_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})


class ContextHost(Protocol):
    """The node's side of a function's context."""

    node_id: str

    async def model_call(self, kind: Literal["generate", "chat", "embed"], body: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer of ``/api/<kind>`` to ``body``; raise an OmxError (with its status) on failure."""
        ...

    def log(self, function: str, line: str) -> None: ...


@dataclass
class CallResult:
    value: Any = None
    """The function's JSON-able result, when it does not stream."""
    stream: AsyncIterator[Any] | None = None
    """The items of a generator function; iterate it to the end or ``aclose()`` it. A failure raises FunctionError."""


def filter_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers a function sees: lower-case names, no credentials, no ``X-Omx-*``."""
    return {name.lower(): value for name, value in headers.items()
            if name.lower() not in _HIDDEN_HEADERS and not name.lower().startswith("x-omx-")}


async def _ensure_sandbox() -> None:
    problem = await sandbox_problem_async()
    if problem is not None:
        raise SandboxUnavailable(problem)


class FunctionPool:
    """Warm sandboxed workers for one function version: 0 to ``spec.concurrency`` of them."""

    def __init__(self, *, filename: str, source: str, spec: FunctionSpec, host: ContextHost,
                 headers_filter: Callable[[Mapping[str, str]], dict[str, str]] = filter_headers,
                 idle_s: float = IDLE_S, queue_wait_s: float = QUEUE_WAIT_S, prewarm: bool = True) -> None:
        self.spec = spec
        self._host = host
        self._headers_filter = headers_filter
        self._idle_s = idle_s
        self._queue_wait_s = queue_wait_s
        self._load = {"filename": filename, "source": source, "qualname": spec.qualname, "node": host.node_id}
        self._cpu_s = max(60, math.ceil(spec.timeout * 6))
        self._workers: set[WorkerProcess] = set()
        self._idle: list[WorkerProcess] = []
        self._warming: asyncio.Task[WorkerProcess] | None = None
        self._inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None
        self._closed = False
        self._seq = 0
        if prewarm:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            self._warm()

    @property
    def workers(self) -> int:
        """How many worker processes the pool holds now (idle and busy)."""
        return len(self._workers)

    async def call(self, body: Any, headers: Mapping[str, str]) -> CallResult:
        """Run the function on ``body``; FunctionError (or SandboxUnavailable) when it fails."""
        if self._closed:
            raise FunctionError(503, f"function {self.spec.name!r} was replaced or removed")
        await _ensure_sandbox()
        await self._acquire()
        try:
            worker = await self._checkout()
        except BaseException:
            self._release()
            raise
        self._seq += 1
        call = _Call(self, worker, self._seq)
        try:
            worker.send(["call", self._seq, body, self._headers_filter(headers)])
        except TypeError as exc:
            await call.finish(ok=True)
            raise FunctionError(400, f"the body is not JSON: {exc}") from None
        except ProtocolError:
            await call.finish(ok=False)
            raise FunctionError(502, f"the worker of function {self.spec.name!r} is gone") from None
        frame = await call.next_frame()
        if frame[0] == "result":
            await call.finish(ok=True)
            return CallResult(value=frame[2])
        return CallResult(stream=_Stream(call))

    async def aclose(self) -> None:
        """Let the calls in flight finish (a stream gets its timeout and a little more), then stop every worker."""
        self._closed = True
        if self._inflight:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.spec.timeout + self._queue_wait_s + START_TIMEOUT_S):
                    await self._drained.wait()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._warming is not None:
            # A worker still starting is let finish and then stopped: cancelling its start could leave it running.
            with contextlib.suppress(Exception):
                self._discard(await self._warming)  # unless its landing already did
        while self._tasks:  # the kills under way
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._idle.clear()
        await asyncio.gather(*(worker.kill() for worker in list(self._workers)), return_exceptions=True)
        self._workers.clear()

    # ------------------------------------------------------------------ slots

    async def _acquire(self) -> None:
        if self._inflight < self.spec.concurrency and not self._waiters:
            self._inflight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._queue_wait_s):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # handed over just as the wait ran out
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise FunctionError(429, f"function {self.spec.name!r} is busy ({self.spec.concurrency} calls at "
                                     "once); try again") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next waiting call
                return
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

    # ------------------------------------------------------------------ workers

    async def _checkout(self) -> WorkerProcess:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            self._discard(worker)
        warming, self._warming = self._warming, None
        if warming is not None:
            try:
                return await asyncio.shield(warming)
            except (FunctionError, SandboxUnavailable):
                pass
            except asyncio.CancelledError:
                warming.add_done_callback(self._land_orphan)
                raise
        return await self._spawn()

    def _land_orphan(self, task: asyncio.Task[WorkerProcess]) -> None:
        """A started worker whose caller went away meanwhile: it waits for the next call."""
        if not task.cancelled() and task.exception() is None:
            self._park(task.result())

    async def _spawn(self) -> WorkerProcess:
        limits = Limits(memory_mb=self.spec.memory_mb, cpu_s=self._cpu_s, nproc=_NPROC, uid=next_uid())
        try:
            worker, frame = await WorkerProcess.start(limits, self._load, on_line=self._log, load_s=START_TIMEOUT_S)
        except ProtocolError as exc:
            raise FunctionError(502, f"function {self.spec.name!r} could not start: {exc}") from None
        except OSError as exc:
            raise SandboxUnavailable(f"bubblewrap does not start: {exc}") from None
        if frame[0] != "ready":
            await worker.kill()
            raise FunctionError(502, f"function {self.spec.name!r} does not load: {frame[2]}")
        self._workers.add(worker)
        return worker

    def _warm(self) -> None:
        """Start a worker ahead of the next call, unless one is idle, starting, or the pool is full."""
        if self._closed or self._idle or self._warming is not None or len(self._workers) >= self.spec.concurrency:
            return
        task = asyncio.get_running_loop().create_task(self._spawn())
        self._warming = task

        def landed(done: asyncio.Task[WorkerProcess]) -> None:
            if self._warming is not done:
                return  # a call took it
            self._warming = None
            if done.cancelled() or done.exception() is not None:
                return
            self._park(done.result())

        task.add_done_callback(landed)

    def _park(self, worker: WorkerProcess) -> None:
        if self._closed or len(self._workers) > self.spec.concurrency or worker.cpu_s > self._cpu_s / 2:
            self._discard(worker)
            return
        worker.idle_since = asyncio.get_running_loop().time()
        self._idle.append(worker)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def _discard(self, worker: WorkerProcess) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
            self._background(worker.kill())

    async def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while self._idle:
            await asyncio.sleep(min(self._idle_s, 5.0))
            cutoff = loop.time() - self._idle_s
            for worker in [w for w in self._idle if w.idle_since <= cutoff or not w.alive]:
                self._idle.remove(worker)
                self._discard(worker)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _log(self, line: str) -> None:
        self._host.log(self.spec.name, line)


class _Call:
    """One call on one worker: reads its frames until a result, answers its model calls."""

    def __init__(self, pool: FunctionPool, worker: WorkerProcess, seq: int) -> None:
        self.pool = pool
        self.worker = worker
        self.seq = seq
        self.deadline = asyncio.get_running_loop().time() + pool.spec.timeout
        self.done = False
        self._model_tasks: set[asyncio.Task[None]] = set()

    async def next_frame(self) -> list[Any]:
        """The next "result", "stream", "item" or "end" frame of this call; FunctionError on any failure."""
        spec = self.pool.spec
        while True:
            try:
                async with asyncio.timeout_at(self.deadline):
                    frame = await self.worker.read()
            except TimeoutError:
                await self.finish(ok=False)
                raise FunctionError(504, f"function {spec.name!r} timed out after {spec.timeout:g} s") from None
            except ProtocolError as exc:
                await self.finish(ok=False)
                raise FunctionError(502, f"function {spec.name!r} broke its worker's protocol: {exc}") from None
            except BaseException:
                await self.finish(ok=False)
                raise
            if frame is None:
                message = await self.worker.ended(f"the worker of function {spec.name!r} crashed")
                if self.worker.ran_out_of_memory():
                    message = f"function {spec.name!r} ran out of memory (limit {spec.memory_mb} MB)"
                await self.finish(ok=False)
                raise FunctionError(502, message)
            op = frame[0]
            if frame[1] != self.seq:
                continue  # stale: from an earlier call
            if op == "model" and len(frame) >= 5:
                task = asyncio.get_running_loop().create_task(self._model(frame[2], frame[3], frame[4]))
                self._model_tasks.add(task)
                task.add_done_callback(self._model_tasks.discard)
            elif op == "log" and len(frame) >= 3:
                self.pool._log(str(frame[2]))
            elif op in ("result", "end"):
                with contextlib.suppress(TypeError, ValueError, IndexError):
                    self.worker.cpu_s += float(frame[-1])
                return frame
            elif op in ("stream", "item"):
                return frame
            elif op == "error" and len(frame) >= 5:
                status = frame[2] if isinstance(frame[2], int) and 400 <= frame[2] <= 599 else 500
                await self.finish(ok=not frame[4])
                raise FunctionError(status, str(frame[3]))

    async def _model(self, rid: Any, kind: Any, body: Any) -> None:
        try:
            if kind not in ("generate", "chat", "embed") or not isinstance(body, dict):
                raise FunctionError(400, f"ctx cannot call {kind!r}")
            body["stream"] = False  # whatever the worker wrote, the context's calls never stream
            reply = ["reply", rid, True, await self.pool._host.model_call(kind, body)]
        except Exception as exc:
            status = getattr(exc, "status", None)
            reply = ["reply", rid, False, [status if isinstance(status, int) else 500, str(exc)]]
        with contextlib.suppress(ProtocolError, TypeError):
            self.worker.send(reply)

    async def finish(self, *, ok: bool) -> None:
        """Give the worker back (ok) or kill it, then free the slot; a second call does nothing."""
        if self.done:
            return
        self.done = True
        for task in self._model_tasks:
            task.cancel()
        pool = self.pool
        try:
            if ok and self.worker.alive:
                pool._park(self.worker)
            else:
                pool._workers.discard(self.worker)
                await self.worker.kill()
        finally:
            pool._release()
            if not ok:
                pool._warm()  # a fresh worker for the next call


class _Stream:
    """The items of a generator function, read from its worker as the consumer asks for them."""

    def __init__(self, call: _Call) -> None:
        self._call = call

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        if self._call.done:
            raise StopAsyncIteration
        frame = await self._call.next_frame()
        if frame[0] == "item":
            return frame[2]
        await self._call.finish(ok=frame[0] == "end")
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop early: the worker is killed (its generator state is unknown) and the slot freed."""
        await self._call.finish(ok=False)
