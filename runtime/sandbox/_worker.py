"""The sandboxed worker: loads one function file and answers calls over its pipes.

Run inside bubblewrap as a script (``python -I -B _worker.py LIMITS``), never
imported by the node: it needs only the standard library, orjson and
:mod:`omx.functions.sdk` (pydantic when the user's module uses it). It first
lowers its own limits and, when the sandbox started it as root, drops to the
unprivileged uid it was given, before it reads a byte of user code.

The protocol is :mod:`omx.runtime.sandbox._wire`'s: frames of a 4-byte
big-endian length and an orjson array, on the descriptors that were stdin and
stdout (user code's ``print`` goes to stderr, which the node collects as log
lines).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import resource
import struct
import sys
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 2**20
_HEADROOM_MB = 4  # what serving calls adds to a freshly loaded worker (its event loop, the first call)


class _Pipe:
    """The worker's end of the protocol: blocking writes, async reads (after :meth:`start`)."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        import orjson

        self._dumps = orjson.dumps
        self._loads = orjson.loads
        self._in = fd_in
        self._out = fd_out
        self._reader: asyncio.StreamReader | None = None
        self._pid = os.getpid()

    def send(self, frame: list[Any]) -> None:
        if os.getpid() != self._pid:
            os._exit(0)  # a child the function forked never answers for it
        data = self._dumps(frame, default=_jsonable)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self._out, view):]

    def read_blocking(self) -> list[Any] | None:
        head = self._read_exact(4)
        if head is None:
            return None
        body = self._read_exact(_HEADER.unpack(head)[0])
        return None if body is None else list(self._loads(body))

    def _read_exact(self, size: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < size:
            data = os.read(self._in, size - len(chunks))
            if not data:
                return None
            chunks += data
        return bytes(chunks)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = asyncio.StreamReader(limit=_MAX_FRAME, loop=loop)
        protocol = asyncio.StreamReaderProtocol(self._reader, loop=loop)
        await loop.connect_read_pipe(lambda: protocol, os.fdopen(self._in, "rb", buffering=0))

    async def read(self) -> list[Any] | None:
        assert self._reader is not None
        try:
            head = await self._reader.readexactly(4)
            body = await self._reader.readexactly(_HEADER.unpack(head)[0])
        except asyncio.IncompleteReadError:
            return None
        return list(self._loads(body))


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # a pydantic model
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _apply_limits(limits: dict[str, Any]) -> None:
    memory = int(limits["memory_mb"]) * 2**20
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["nproc"]), int(limits["nproc"])))
    resource.setrlimit(resource.RLIMIT_FSIZE, (memory, memory))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    if os.getuid() == 0:
        # Started as root (a privileged bubblewrap without a user namespace): become the
        # uid the node chose, so RLIMIT_NPROC applies and no capability is left.
        uid, gid = int(limits["uid"]), int(limits["gid"])
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("the worker could not drop root")


class _Failure(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def _user_line(tb: types.TracebackType | None, filename: str) -> int | None:
    line = None
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == filename:
            line = lineno
    return line


def _load(filename: str, source: str) -> types.ModuleType:
    stem = os.path.basename(filename).rsplit(".", 1)[0]
    taken = stem in sys.modules or stem in sys.stdlib_module_names
    name = stem if stem.isidentifier() and not taken else "function_module"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise _Failure(f"{type(exc).__name__}: {exc.msg}", exc.lineno) from None
    except ValueError as exc:  # null bytes
        raise _Failure(f"the source does not compile: {exc}", None) from None
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except MemoryError:
        raise _Failure("importing the module ran out of memory", None) from None
    except BaseException as exc:  # the module's own code failed: report it, whatever it was
        raise _Failure(f"{type(exc).__name__}: {exc}", _user_line(exc.__traceback__, filename)) from None
    return module


def _handlers(module: types.ModuleType, filename: str, *,
              inspecting: bool) -> list[tuple[Any, Callable[..., Any]]]:
    from omx.functions.sdk import SPEC_ATTRIBUTE, FunctionSpec

    found: list[tuple[Any, Callable[..., Any]]] = []
    seen: set[int] = set()
    for attribute, value in list(vars(module).items()):
        try:
            spec = getattr(value, SPEC_ATTRIBUTE, None)
        except Exception:
            continue
        if not isinstance(spec, FunctionSpec) or id(value) in seen:
            continue
        seen.add(id(value))
        line = getattr(getattr(value, "__code__", None), "co_firstlineno", None)
        if _parameters(value) is None:
            raise _Failure(f"function {spec.name!r} must take (body) or (body, ctx)", line)
        found.append((FunctionSpec.from_json({**spec.to_json(), "qualname": attribute}), value))
    if not found:
        raise _Failure(f"{filename} defines no function decorated with @function", None)
    need = _address_space_mb() + _HEADROOM_MB
    for spec, fn in found if inspecting else ():
        if spec.memory_mb < need:
            line = getattr(getattr(fn, "__code__", None), "co_firstlineno", None)
            raise _Failure(f"function {spec.name!r} has memory_mb={spec.memory_mb}, but its worker takes "
                           f"{need} MB with this module imported (memory_mb limits the whole process)", line)
    for kind in ("name", "path"):
        values = [getattr(spec, kind) for spec, _ in found]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise _Failure(f"two functions in {filename} have the {kind} {twice[0]!r}", None)
    return found


def _address_space_mb() -> int:
    """This process's address space now, in MiB (what RLIMIT_AS counts)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return -(-int(line.split()[1]) // 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _parameters(fn: Any) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) > 2 or len(positional) < 1 or any(
            p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return None
    return min(len(positional), 2)


def _body_model(fn: Any) -> Any:
    """The pydantic model the body is validated against, or None for a plain dict."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:
        return None
    try:
        import typing

        hints = typing.get_type_hints(fn)
    except Exception:
        hints = getattr(fn, "__annotations__", {})
    first = next(iter(inspect.signature(fn).parameters), None)
    annotation = hints.get(first) if first else None
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def _validation_message(exc: Any) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or str(exc)


class _Worker:
    def __init__(self, pipe: _Pipe, fn: Callable[..., Any], node: str, memory_mb: int) -> None:
        self.pipe = pipe
        self.fn = fn
        self.node = node
        self.memory_mb = memory_mb
        self.arity = _parameters(fn) or 1
        self.model = _body_model(fn)
        self.seq = 0
        self.pid = os.getpid()
        self.next_rid = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}

    # The channel a Context talks through.
    async def request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        from omx.functions.sdk import ModelCallError

        self.next_rid += 1
        rid = self.next_rid
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        try:
            self.pipe.send(["model", self.seq, rid, kind, body])
            ok, value = await future
        finally:
            self.pending.pop(rid, None)
        if not ok:
            raise ModelCallError(int(value[0]), str(value[1]))
        return dict(value)

    def log(self, line: str) -> None:
        self.pipe.send(["log", self.seq, line])

    async def serve(self) -> None:
        await self.pipe.start()
        current: asyncio.Task[None] | None = None
        while True:
            frame = await self.pipe.read()
            if frame is None:
                return
            if frame[0] == "reply":
                future = self.pending.get(frame[1])
                if future is not None and not future.done():
                    future.set_result((frame[2], frame[3]))
            elif frame[0] == "call" and (current is None or current.done()):
                current = asyncio.create_task(self.call(frame[1], frame[2], frame[3]))

    async def call(self, seq: int, body: Any, headers: dict[str, str]) -> None:
        from omx.functions.sdk import Context, ModelCallError

        self.seq = seq
        start_cpu = time.process_time()
        retire = False
        try:
            if self.model is not None:
                try:
                    body = self.model.model_validate(body)
                except Exception as exc:
                    if type(exc).__name__ != "ValidationError":
                        raise
                    self.pipe.send(["error", seq, 400, _validation_message(exc), False])
                    return
            args = (body, Context(node=self.node, headers=headers, channel=self))[:self.arity]
            result = self.fn(*args)
            if inspect.isawaitable(result):
                result = await result
            if inspect.isasyncgen(result):
                self.pipe.send(["stream", seq])
                async for item in result:
                    self._item(seq, item)
            elif inspect.isgenerator(result):
                self.pipe.send(["stream", seq])
                for item in result:
                    self._item(seq, item)
            else:
                self._result(["result", seq, result, time.process_time() - start_cpu])
                return
            self.pipe.send(["end", seq, time.process_time() - start_cpu])
        except MemoryError:
            retire = True
            self._error(seq, 502, f"the function ran out of memory (limit {self.memory_mb} MB)", True)
        except ModelCallError as exc:
            self._error(seq, exc.status, exc.message, False)
        except Exception as exc:
            self._error(seq, 500, f"{type(exc).__name__}: {exc}", False)
        finally:
            if os.getpid() != self.pid:
                os._exit(0)
            _end_strays()
            if retire:
                os._exit(3)

    def _item(self, seq: int, item: Any) -> None:
        try:
            self.pipe.send(["item", seq, item])
        except TypeError as exc:
            raise TypeError(f"the function streamed a value that is not JSON: {exc}") from None

    def _result(self, frame: list[Any]) -> None:
        try:
            self.pipe.send(frame)
        except TypeError as exc:
            raise TypeError(f"the function returned a value that is not JSON: {exc}") from None

    def _error(self, seq: int, status: int, message: str, retire: bool) -> None:
        try:
            self.pipe.send(["error", seq, status, message, retire])
        except (TypeError, MemoryError):
            self.pipe.send(["error", seq, status, "the function failed", retire])


def _end_strays() -> None:
    """Kill whatever processes the call left behind: a call's processes end with it.

    The worker has a pid namespace of its own, where ``kill(-1)`` reaches every
    process it may signal except the namespace's init (bubblewrap) and itself.
    """
    if os.getppid() != 1:
        return  # not a pid namespace's first child: kill(-1) would reach beyond the sandbox
    for attempt in range(200):
        try:
            os.kill(-1, 9)
        except (ProcessLookupError, PermissionError):
            return
        _reap()
        if attempt:
            time.sleep(0.001)


def _reap() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    import json

    limits = json.loads(argv[1])
    # The protocol keeps the original stdin/stdout; user code's fds 0 and 1 become /dev/null and stderr.
    fd_in, fd_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    sys.stdout = sys.stderr
    _apply_limits(limits)
    if limits.get("probe"):
        return 0
    import faulthandler

    faulthandler.enable()
    pipe = _Pipe(fd_in, fd_out)
    load = pipe.read_blocking()
    if load is None or load[0] != "load":
        return 2
    filename, source, qualname, node = load[1]["filename"], load[1]["source"], load[1]["qualname"], load[1]["node"]
    try:
        handlers = _handlers(_load(filename, source), filename, inspecting=qualname is None)
        if qualname is not None:
            handlers = [(spec, fn) for spec, fn in handlers if spec.qualname == qualname]
            if not handlers:
                raise _Failure(f"{filename} no longer defines {qualname!r}", None)
    except _Failure as exc:
        pipe.send(["fatal", 0, exc.message, exc.line])
        return 1
    pipe.send(["ready", 0, [spec.to_json() for spec, _ in handlers]])
    if qualname is None:
        return 0
    worker = _Worker(pipe, handlers[0][1], str(node), int(limits["memory_mb"]))
    asyncio.run(worker.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
