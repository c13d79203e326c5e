"""The node side of a runner subprocess: :class:`ProcessRunner`.

The stdout pipe's callback decodes frames from the runner and routes them by
request id to a per-request :class:`_Stream` (generations) or future (one-shot
requests); a task keeps the tail of the runner's stderr for error messages.
When stdout ends, every pending request fails with
:class:`omx.errors.RunnerCrashed`. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from omx.errors import EngineError, InvalidRequest, OmxError, RunnerCrashed, UnsupportedCapability
from omx.processes import child_env
from omx.protocols import Completion, CompletionChunk, CompletionDone, EmbedResult, ModelSpec, SamplingOptions
from omx.runtime.engine import _wire

__all__ = ["ProcessRunner", "runner_env"]

_CLOSE_GRACE = 5.0

# What llama.cpp (or ctransformers) may need from the node's environment: where shared libraries
# are (LD_LIBRARY_PATH, LLAMA_CPP_LIB_PATH), thread settings (OpenMP, BLAS), ggml's and llama's own
# switches, and GPU selection (CUDA, ROCm, Vulkan, oneAPI).
_RUNNER_KEEP = ("LD_LIBRARY_PATH",)
_RUNNER_PREFIXES = ("LLAMA_", "GGML_", "OMP_", "GOMP_", "KMP_", "OPENBLAS_", "MKL_", "CUDA_", "NVIDIA_", "HIP_",
                    "ROCR_", "HSA_", "GPU_", "VK_", "ZE_", "ONEAPI_", "SYCL_")


def runner_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A runner's whole environment: :func:`omx.processes.child_env` with the variables above.

    ``PYTHONPATH`` is the node's own ``sys.path``, so a runner imports the omx
    the node runs (a source checkout, a user site, a ``PYTHONPATH``) although
    none of the node's ``PYTHON*`` variables or its ``HOME`` is passed.
    """
    path = os.pathsep.join(dict.fromkeys(entry or os.getcwd() for entry in sys.path))
    return child_env(keep=_RUNNER_KEEP, keep_prefixes=_RUNNER_PREFIXES, extra={"PYTHONPATH": path, **(extra or {})})


def _request_error(kind: str, message: str) -> Exception:
    if kind == _wire.ERR_INVALID:
        return InvalidRequest(message)
    if kind == _wire.ERR_UNSUPPORTED:
        return UnsupportedCapability(message)
    return EngineError(message)


class _Stream:
    """Items of one generation: text pieces, then a done dict or an exception."""

    __slots__ = ("event", "items", "last", "watchdog")

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.event = asyncio.Event()
        self.last = time.monotonic()
        """When the runner last sent something for this generation (``time.monotonic``)."""
        self.watchdog: asyncio.TimerHandle | None = None

    def push(self, item: Any) -> None:
        self.items.append(item)
        self.last = time.monotonic()
        self.event.set()


_OPTION_FIELDS = tuple(f.name for f in fields(SamplingOptions))


def _options(options: SamplingOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in _OPTION_FIELDS}


class _Generation:
    """The node's end of one generation: an async iterator of chunks, then a done."""

    __slots__ = ("_finished", "_rid", "_runner", "_stream")

    def __init__(self, runner: ProcessRunner, rid: int, stream: _Stream) -> None:
        self._runner = runner
        self._rid = rid
        self._stream = stream
        self._finished = False

    def __aiter__(self) -> _Generation:
        return self

    async def __anext__(self) -> CompletionChunk | CompletionDone:
        if self._finished:
            raise StopAsyncIteration
        stream = self._stream
        items = stream.items
        # No timer per wait on the token path: the runner's watchdog ends a silent generation.
        while not items:
            stream.event.clear()
            await stream.event.wait()
        item = items.popleft()
        if type(item) is str:
            # One chunk per piece the runner sent, even when several arrived together:
            # clients count and time the lines of a stream (Ollama sends one per token).
            return CompletionChunk(item)
        self._end()
        if type(item) is dict:
            return CompletionDone(
                done_reason=item["done_reason"],
                prompt_eval_count=item["prompt_eval_count"],
                prompt_eval_duration=item["prompt_eval_duration"],
                eval_count=item["eval_count"],
                eval_duration=item["eval_duration"],
                context=tuple(item.get("context", ())),
            )
        raise item

    def _end(self) -> None:
        self._finished = True
        self._runner._streams.pop(self._rid, None)
        if self._stream.watchdog is not None:
            self._stream.watchdog.cancel()

    async def aclose(self) -> None:
        """Stop listening; a generation still running in the runner is cancelled."""
        if self._finished:
            return
        self._end()
        self._runner._cancel(self._rid)


class _RunnerPipes(asyncio.subprocess.SubprocessStreamProtocol):
    """The runner's pipes; once ``on_stdout`` is set, stdout bytes go straight to it.

    Decoding frames in the transport's own callback, rather than in a task
    reading a stream, saves a task switch for every token.
    """

    on_stdout: Callable[[bytes], None] | None = None
    on_stdout_end: Callable[[], None] | None = None

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd == 1 and self.on_stdout is not None:
            self.on_stdout(data if isinstance(data, bytes) else data.encode())
        else:
            super().pipe_data_received(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        super().pipe_connection_lost(fd, exc)
        if fd == 1 and self.on_stdout_end is not None:
            self.on_stdout_end()


class ProcessRunner:
    """A loaded model in its own process, implementing :class:`omx.protocols.Runner`.

    Start one with :meth:`spawn` (engines do). ``info`` holds what the runner
    reported once loaded (context size, vocabulary size, chat template…).
    """

    def __init__(self, spec: ModelSpec, proc: asyncio.subprocess.Process, pipes: _RunnerPipes,
                 info: dict[str, Any], reader: Any, stderr_tail: collections.deque[str],
                 stderr_task: asyncio.Task[None], *, token_timeout: float) -> None:
        self.spec = spec
        self.info = info
        self._proc = proc
        self._decoder = reader
        self._stderr_tail = stderr_tail
        self._stderr_task = stderr_task
        self.token_timeout = token_timeout
        self._ids = itertools.count(1)
        self._streams: dict[int, _Stream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._closing = False
        self._failure: Exception | None = None
        self.cancelled_generations = 0
        """How many generations the runner reported as stopped by a cancel."""
        self.preemptions = 0
        """Times a generation stepped aside for room in a shared KV cache (from the runner's done frames)."""
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        """Done once stdout has ended and every pending request has been failed."""
        self._exit_task: asyncio.Task[None] | None = None
        pipes.on_stdout = self._on_stdout
        pipes.on_stdout_end = self._on_stdout_end
        self._dispatch()  # anything that came with the ready frame
        if proc.stdout is not None and proc.stdout.at_eof():
            self._on_stdout_end()

    # ------------------------------------------------------------------ start

    @classmethod
    async def spawn(cls, spec: ModelSpec, config: dict[str, Any], *, python: str | None = None,
                    load_timeout: float = 300.0, token_timeout: float = 600.0,
                    env: dict[str, str] | None = None) -> ProcessRunner:
        """Start ``python -m omx.runtime.engine.runner`` and wait until the model is loaded.

        The runner gets :func:`runner_env` plus ``env``, nothing else of the
        node's environment. It asks Linux to kill it when its parent dies
        (``PR_SET_PDEATHSIG``), and Linux means the parent *thread*: the event
        loop's thread forks it here, and that thread lives as long as the node.
        """
        loop = asyncio.get_running_loop()
        transport, pipes = await loop.subprocess_exec(
            lambda: _RunnerPipes(limit=2**16, loop=loop),
            # -P: imports come from the node's own path (runner_env's PYTHONPATH), not the working directory.
            python or sys.executable, "-P", "-m", "omx.runtime.engine.runner", "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=runner_env(env),
            # Its own session: a Ctrl-C meant for the node must not kill runners behind the node's back.
            start_new_session=True,
        )
        proc = asyncio.subprocess.Process(transport, pipes, loop)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        tail: collections.deque[str] = collections.deque(maxlen=40)
        stderr_task = loop.create_task(_drain(proc.stderr, tail))
        decoder = _wire.decoder()
        try:
            proc.stdin.write(_wire.encode(["load", 0, config]))
            await asyncio.wait_for(proc.stdin.drain(), load_timeout)
            first = await asyncio.wait_for(_first_frame(proc.stdout, decoder), load_timeout)
        except (TimeoutError, ConnectionError, BrokenPipeError) as exc:
            await _kill(proc)
            await _settle(stderr_task)
            reason = "timed out" if isinstance(exc, TimeoutError) else "lost its pipe"
            raise EngineError(f"loading model '{spec.name}' {reason}{_last_line(tail)}") from None
        if first is None or first[0] != "ready":
            await _kill(proc)
            await _settle(stderr_task)
            detail = first[2] if first is not None and first[0] == "fatal" else _exit_text(proc.returncode)
            raise EngineError(f"failed to load model '{spec.name}': {detail}{_last_line(tail)}")
        return cls(spec, proc, pipes, first[2], decoder, tail, stderr_task, token_timeout=token_timeout)

    # ------------------------------------------------------------------ Runner

    @property
    def alive(self) -> bool:
        return self._failure is None and not self._closing and self._proc.returncode is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def complete(self, request: Completion) -> _Generation:
        """Send the request now and return its stream of chunks, then one done.

        The frame is on its way to the runner when this returns, so a caller can
        do other work (send response headers) while the first token is computed.
        Closing the stream early (``aclose``) cancels the generation in the runner.
        """
        self._check()
        rid = next(self._ids)
        stream = _Stream()
        self._streams[rid] = stream
        try:
            self._write(["complete", rid, {
                "prompt": request.prompt,
                "options": _options(request.options),
                "context": request.context,
                "add_bos": request.add_bos,
                "return_context": request.return_context,
            }])
        except BaseException:
            del self._streams[rid]
            raise
        stream.watchdog = asyncio.get_running_loop().call_later(self.token_timeout, self._watch, rid)
        return _Generation(self, rid, stream)

    def _watch(self, rid: int) -> None:
        """End generation ``rid`` if the runner has sent nothing for ``token_timeout`` seconds."""
        stream = self._streams.get(rid)
        if stream is None or (stream.items and type(stream.items[-1]) is not str):
            return  # finished, or its end is already waiting to be read
        quiet = time.monotonic() - stream.last
        if quiet < self.token_timeout:
            stream.watchdog = asyncio.get_running_loop().call_later(self.token_timeout - quiet, self._watch, rid)
            return
        stream.watchdog = None
        self._streams.pop(rid, None)
        self._cancel(rid)
        stream.push(EngineError(f"model '{self.spec.name}' produced nothing for {self.token_timeout:g} s"))

    async def embed(self, inputs: Sequence[str], *, normalize: bool, truncate: bool = True) -> EmbedResult:
        vectors, count = await self._call("embed", list(inputs), normalize, truncate)
        return EmbedResult(tuple(tuple(v) for v in vectors), int(count))

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(await self._call("tokenize", text, add_special))

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return str(await self._call("detokenize", list(tokens)))

    async def stats(self) -> dict[str, int]:
        """The runner's decode-loop counters (batching backend: ``steps``, ``admitted`` (placements on a
        sequence), ``preemptions``, ``peak_running``, ``kv_cells_used``; empty for the others)."""
        return {str(k): int(v) for k, v in dict(await self._call("stats")).items()}

    async def close(self) -> None:
        """Stop the runner: end of stdin first, SIGKILL if it lingers."""
        if self._closing:
            await _settle(self._exited)
            return
        self._closing = True
        stdin = self._proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), _CLOSE_GRACE)
        except TimeoutError:
            await _kill(self._proc)
        await _settle(self._exited)
        await _settle(self._stderr_task)

    # ------------------------------------------------------------------ plumbing

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise EngineError(f"runner for model '{self.spec.name}' is closed")

    def _cancel(self, rid: int) -> None:
        if self.alive:
            try:
                self._write(["cancel", rid])
            except (OmxError, ConnectionError, BrokenPipeError):
                pass  # the runner is gone; nothing left to cancel

    def _write(self, frame: list[Any]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        if stdin.is_closing():
            raise self._failure or RunnerCrashed(f"runner for model '{self.spec.name}' is gone")
        stdin.write(_wire.encode(frame))

    async def _send(self, frame: list[Any]) -> None:
        self._check()
        self._write(frame)
        try:
            async with asyncio.timeout(self.token_timeout):
                await self._proc.stdin.drain()  # type: ignore[union-attr]
        except (ConnectionError, BrokenPipeError):
            await _settle(self._exited)
            raise self._failure or RunnerCrashed(f"runner for model '{self.spec.name}' is gone") from None

    async def _call(self, op: str, *args: Any) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[rid] = future
        try:
            await self._send([op, rid, *args])
            return await asyncio.wait_for(future, self.token_timeout)
        except TimeoutError:
            raise EngineError(f"model '{self.spec.name}' did not answer {op} in time") from None
        finally:
            self._calls.pop(rid, None)

    def _on_stdout(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._dispatch()

    def _dispatch(self) -> None:
        """Route every whole frame received so far to its request."""
        streams, calls = self._streams, self._calls
        try:
            for frame in self._decoder:
                op, rid = frame[0], frame[1]
                if op == "t" or op == "done":
                    stream = streams.get(rid)
                    if stream is not None:
                        stream.push(frame[2])
                    if op == "done":
                        self.preemptions += frame[2].get("preempted", 0)
                elif op == "ok":
                    future = calls.get(rid)
                    if future is not None and not future.done():
                        future.set_result(frame[2])
                elif op == "err":
                    if frame[2] == _wire.ERR_CANCELLED:
                        self.cancelled_generations += 1
                    error = _request_error(frame[2], frame[3])
                    stream = streams.get(rid)
                    if stream is not None:
                        stream.push(error)
                    future = calls.get(rid)
                    if future is not None and not future.done():
                        future.set_exception(error)
        except Exception as exc:  # noqa: BLE001 - a garbled stream: the runner cannot be trusted
            self._stderr_tail.append(f"garbled frame from the runner: {exc}")
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()

    def _on_stdout_end(self) -> None:
        if self._exit_task is None:
            self._exit_task = asyncio.get_running_loop().create_task(self._on_exit())

    async def _on_exit(self) -> None:
        code: int | None
        try:
            code = await asyncio.wait_for(self._proc.wait(), _CLOSE_GRACE)
        except TimeoutError:
            await _kill(self._proc)
            code = self._proc.returncode
        await _settle(self._stderr_task, grace=1.0)
        if self._closing:
            failure: Exception = EngineError(f"runner for model '{self.spec.name}' was closed")
        else:
            failure = RunnerCrashed(
                f"runner for model '{self.spec.name}' exited unexpectedly ({_exit_text(code)})"
                f"{_last_line(self._stderr_tail)}"
            )
        self._failure = failure
        for stream in list(self._streams.values()):
            stream.push(failure)
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(failure)
        if not self._exited.done():
            self._exited.set_result(None)


async def _first_frame(stdout: asyncio.StreamReader, decoder: Any) -> list[Any] | None:
    while True:
        for frame in decoder:
            return list(frame)
        data = await stdout.read(65536)
        if not data:
            return None
        decoder.feed(data)


async def _drain(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    while True:
        line = await stream.readline()
        if not line:
            return
        text = line.decode("utf-8", errors="replace").rstrip()
        if text:
            tail.append(text)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        await asyncio.wait_for(proc.wait(), _CLOSE_GRACE)
    except TimeoutError:
        pass


async def _settle(task: asyncio.Future[Any], grace: float = _CLOSE_GRACE) -> None:
    """Wait for a background task to end, cancelling it if it does not."""
    if task.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), grace)
    except TimeoutError:
        task.cancel()
    except Exception:
        pass


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _last_line(tail: collections.deque[str]) -> str:
    return f": {tail[-1]}" if tail else ""
