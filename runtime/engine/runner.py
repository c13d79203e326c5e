"""The runner subprocess: ``python -m omx.runtime.engine.runner``.

It reads frames (see :mod:`omx.runtime.engine._wire`) on stdin and writes
frames to the original stdout; file descriptor 1 is pointed at stderr first,
so anything native code prints can never corrupt the frame stream. The first
frame says what to load; then generations go to the backend's decode loop (the
batching llama.cpp backend decodes them together in one context) or, for the
other backends, each runs in its own thread on a free slot; one-shot requests
run on a small thread pool, so the reading loop always sees ``cancel`` frames
promptly. End of stdin (the node closed the
runner or died) ends the process; so does the node's death mid native call
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from omx.runtime.engine import _wire
from omx.runtime.engine._wire import ERR_ENGINE, RequestError

__all__ = ["main"]


def _die_with_parent(parent: int | None) -> None:
    """Ask Linux to kill this process when the node dies, even mid native call.

    Set here rather than in a ``preexec_fn`` (unsafe in the node's threaded
    process). If the node died before this took effect, the runner has been
    handed to another parent already: it exits now. ``parent`` is the node's
    pid (``--parent``); None skips that check (a runner started by hand).
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(3)


def _parent_arg(argv: list[str]) -> int | None:
    """The node's pid from ``--parent PID``, if given."""
    if "--parent" in argv[:-1]:
        return int(argv[argv.index("--parent") + 1])
    return None


class _Channel:
    """Thread-safe frame writer over a raw file descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, frame: list[Any]) -> None:
        data = memoryview(_wire.encode(frame))
        with self._lock:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]


def _load_backend(config: dict[str, Any]) -> Any:
    backend = config.get("backend", "llama-cpp")
    if backend == "llama-cpp":
        if config.get("batching", True):
            from omx.runtime.engine._batch_backend import BatchBackend

            return BatchBackend(config)
        from omx.runtime.engine._llama_backend import LlamaBackend

        return LlamaBackend(config)
    if backend == "ctransformers":
        from omx.runtime.engine._ctransformers_backend import CTransformersBackend

        return CTransformersBackend(config)
    raise RequestError(ERR_ENGINE, f"unknown backend {backend!r}")


class _Server:
    def __init__(self, channel: _Channel, backend: Any) -> None:
        self._channel = channel
        self._backend = backend
        # One long-lived thread per slot: llama.cpp's compute threads (an OpenMP team)
        # belong to the thread that drives them, and building a team for a fresh
        # thread on every request cost ~15 ms of time to first token.
        self._jobs: queue.SimpleQueue[tuple[int, dict[str, Any], threading.Event]] = queue.SimpleQueue()
        # A batching backend runs its own decode loop; the others get one thread per slot.
        self._batching = bool(getattr(backend, "batching", False))
        for slot in range(0 if self._batching else len(backend.slots)):
            threading.Thread(target=self._slot_worker, args=(slot,), daemon=True, name=f"omx-slot-{slot}").start()
        self._cancels: dict[int, threading.Event] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="omx-runner-io")

    def dispatch(self, frame: list[Any]) -> None:
        op, rid = frame[0], frame[1]
        if op == "complete" and self._batching:
            send = self._channel.send
            self._backend.submit(rid, frame[2], lambda text: send(["t", rid, text]),
                                 lambda kind, value: self._finished(rid, kind, value))
        elif op == "cancel" and self._batching:
            self._backend.cancel(rid)
        elif op == "complete":
            cancel = threading.Event()
            self._cancels[rid] = cancel
            self._jobs.put((rid, frame[2], cancel))
        elif op == "cancel":
            event = self._cancels.get(rid)
            if event is not None:
                event.set()
        elif op == "tokenize":
            self._pool.submit(self._one_shot, rid, self._backend.tokenize, frame[2], bool(frame[3]))
        elif op == "detokenize":
            self._pool.submit(self._one_shot, rid, self._backend.detokenize, frame[2])
        elif op == "stats":
            self._pool.submit(self._one_shot, rid, self._stats)
        elif op == "embed":
            self._pool.submit(self._one_shot, rid, self._embed, frame[2], bool(frame[3]), bool(frame[4]))
        else:
            self._channel.send(["err", rid, ERR_ENGINE, f"unknown operation {op!r}"])

    def _finished(self, rid: int, kind: str, value: Any) -> None:
        if kind == "done":
            self._channel.send(["done", rid, value])
        else:
            self._channel.send(["err", rid, kind, value])

    def _stats(self) -> dict[str, Any]:
        stats = getattr(self._backend, "stats", None)
        return stats() if stats is not None else {}

    def _embed(self, inputs: list[str], normalize: bool, truncate: bool) -> list[Any]:
        vectors, count = self._backend.embed(inputs, normalize, truncate)
        return [vectors, count]

    def _one_shot(self, rid: int, func: Any, *args: Any) -> None:
        try:
            value = func(*args)
        except RequestError as exc:
            self._channel.send(["err", rid, exc.kind, exc.message])
        except Exception as exc:
            traceback.print_exc()
            self._channel.send(["err", rid, ERR_ENGINE, f"{type(exc).__name__}: {exc}"])
        else:
            self._channel.send(["ok", rid, value])

    def _slot_worker(self, slot: int) -> None:
        while True:
            rid, request, cancel = self._jobs.get()
            self._complete(slot, rid, request, cancel)

    def _complete(self, slot: int, rid: int, request: dict[str, Any], cancel: threading.Event) -> None:
        send = self._channel.send
        try:
            if cancel.is_set():
                raise RequestError(_wire.ERR_CANCELLED, "generation cancelled")
            done = self._backend.complete(slot, request, lambda text: send(["t", rid, text]), cancel)
        except RequestError as exc:
            send(["err", rid, exc.kind, exc.message])
        except Exception as exc:
            traceback.print_exc()
            send(["err", rid, ERR_ENGINE, f"{type(exc).__name__}: {exc}"])
        else:
            send(["done", rid, done])
        finally:
            self._cancels.pop(rid, None)


def _frames(fd: int) -> Any:
    unpacker = _wire.decoder()
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        unpacker.feed(data)
        yield from unpacker


def main() -> int:
    """Serve frames until stdin closes."""
    _die_with_parent(_parent_arg(sys.argv))
    out_fd = os.dup(1)
    os.dup2(2, 1)
    channel = _Channel(out_fd)
    frames = _frames(0)
    first = next(frames, None)
    if first is None or first[0] != "load":
        return 2
    try:
        backend = _load_backend(first[2])
    except RequestError as exc:
        channel.send(["fatal", 0, exc.message])
        return 1
    except Exception as exc:
        traceback.print_exc()
        channel.send(["fatal", 0, f"{type(exc).__name__}: {exc}"])
        return 1
    channel.send(["ready", 0, backend.info()])
    server = _Server(channel, backend)
    for frame in frames:
        server.dispatch(frame)
    # The node is gone or closed us: generation threads must not keep the process alive.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
