"""The model scheduler: loads models on demand and hands out runner slots.

The decisions (how long a model stays loaded, which idle model to evict) are
pure functions at the top of this module; :class:`ModelScheduler` is the
asyncio shell that owns runners, timers and waiting requests. All its state
changes happen between awaits on the event loop, so it needs no lock: a
request that finds no entry for its model creates one and starts the load in
the same step, and every later request for that key waits on the same load.

A model name has at most one entry, as ``/api/ps`` shows it: a request whose
load options differ from the loaded instance's (another ``num_ctx``…) marks
that instance *draining*. A draining instance takes no new requests, serves
the ones already waiting for it, and is unloaded once idle; then the model is
loaded again with the new options. Ollama reloads the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from omx.errors import ServiceBusy
from omx.protocols import Engine, LoadedModel, ModelSpec, Runner

__all__ = ["ModelScheduler", "ModelState", "is_expired", "pick_victim", "resolve_keep_alive"]

T = TypeVar("T")


# ------------------------------------------------------------------ pure core


def resolve_keep_alive(keep_alive: float | None, default: float) -> float | None:
    """Seconds a model stays loaded after its last request; None means forever, 0 means unload now."""
    value = default if keep_alive is None else float(keep_alive)
    return None if value < 0 else value


def is_expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and now >= expires_at


@dataclass(frozen=True)
class ModelState:
    """What eviction needs to know about one loaded model."""

    key: tuple[object, ...]
    ready: bool
    active: int
    waiting: int
    last_used: float
    expires_at: float | None


def pick_victim(states: Iterable[ModelState], now: float) -> tuple[object, ...] | None:
    """The idle model to unload to make room: expired ones first, then the least recently used.

    A model that is loading, serving, or awaited by a queued request is never chosen.
    """
    idle = [s for s in states if s.ready and s.active == 0 and s.waiting == 0]
    if not idle:
        return None
    return min(idle, key=lambda s: (not is_expired(s.expires_at, now), s.last_used)).key


# ------------------------------------------------------------------ shell


class _Entry:
    __slots__ = ("active", "capacity", "close_task", "closed", "draining", "expires_at", "keep_alive", "last_used",
                 "load", "restart_lock", "runner", "served", "slots", "spec", "timer", "waiting")

    def __init__(self, spec: ModelSpec, slots: int, now: float) -> None:
        self.spec = spec
        self.runner: Runner | None = None
        self.load: asyncio.Task[Runner] | None = None
        self.slots = asyncio.Semaphore(slots)
        self.capacity = slots
        """Requests served at once: ``num_parallel``, or the runner's sequences when it has more."""
        self.active = 0
        self.waiting = 0
        self.served = 0
        self.last_used = now
        self.expires_at: float | None = None
        self.keep_alive: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.draining = False
        """A request for this model with other load options waits for this instance to go idle."""
        self.close_task: asyncio.Task[None] | None = None
        self.restart_lock = asyncio.Lock()

    def state(self) -> ModelState:
        return ModelState(self.spec.key, self.runner is not None, self.active, self.waiting, self.last_used,
                          self.expires_at)


class ModelScheduler:
    """Implements :class:`omx.protocols.Scheduler` over an :class:`omx.protocols.Engine`.

    ``num_parallel`` is the number of concurrent requests per loaded model
    (a spec with ``num_parallel`` > 1 overrides it); with a batching runner each
    slot is a sequence of the model's one context, decoded together with the others, and a runner
    whose one KV cache is shared by more sequences (``sequences`` in its info) gets that many
    slots: it admits them by room in its cache itself; ``max_queue`` bounds the
    requests waiting for a load or a slot (:class:`omx.errors.ServiceBusy`
    beyond it); ``wait_timeout`` bounds how long one request waits.
    """

    def __init__(self, engine: Engine, *, max_loaded_models: int = 3, num_parallel: int = 1,
                 max_queue: int = 512, default_keep_alive: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 wait_timeout: float = 600.0) -> None:
        if max_loaded_models < 1 or num_parallel < 1 or max_queue < 1:
            raise ValueError("max_loaded_models, num_parallel and max_queue must be at least 1")
        self.engine = engine
        self.max_loaded_models = max_loaded_models
        self.num_parallel = num_parallel
        self.max_queue = max_queue
        self.default_keep_alive = default_keep_alive
        self.wait_timeout = wait_timeout
        self._clock = clock
        self._wall = wall_clock
        self._entries: dict[tuple[object, ...], _Entry] = {}
        self._closing = 0
        self._queued = 0
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ protocol

    @asynccontextmanager
    async def lease(self, spec: ModelSpec, *, keep_alive: float | None) -> AsyncIterator[Runner]:
        """A slot on a runner for ``spec``, loading the model if needed (see the protocol)."""
        keep = resolve_keep_alive(keep_alive, self.default_keep_alive)
        entry = await self._acquire(spec, keep)
        assert entry.runner is not None
        try:
            yield entry.runner
        finally:
            self._release(entry, keep)

    async def load(self, spec: ModelSpec, *, keep_alive: float | None) -> float:
        """Load ``spec`` (or refresh its expiry) without generating; returns the seconds it took."""
        started = time.perf_counter()
        async with self.lease(spec, keep_alive=keep_alive):
            elapsed = time.perf_counter() - started
        return elapsed

    async def unload(self, name: str) -> bool:
        """Unload every instance of model ``name`` (in-flight requests finish first)."""
        found = [e for e in self._entries.values() if e.spec.name == name]
        for entry in found:
            self._unload(entry)
        idle = [e.close_task for e in found if e.close_task is not None]
        if idle:
            await asyncio.wait(idle, timeout=30)
        return bool(found)

    def loaded(self) -> list[LoadedModel]:
        """Rows for ``/api/ps``: models whose runner is up."""
        now, wall = self._clock(), self._wall()
        rows = []
        for entry in self._entries.values():
            if entry.runner is None:
                continue
            if entry.active:
                expires = None if entry.keep_alive is None else wall + entry.keep_alive
            else:
                expires = None if entry.expires_at is None else wall + (entry.expires_at - now)
            info = getattr(entry.runner, "info", None) or {}
            rows.append(LoadedModel(
                name=entry.spec.name, digest=entry.spec.digest, size=entry.spec.size, expires_at=expires,
                context_length=int(info.get("n_ctx", entry.spec.num_ctx)),
                active_requests=entry.active, requests_served=entry.served,
                pid=getattr(entry.runner, "pid", None),
                cancelled_generations=int(getattr(entry.runner, "cancelled_generations", 0)),
                preemptions=int(getattr(entry.runner, "preemptions", 0)),
                size_vram=int(info.get("size_vram", 0)), gpu_layers=int(info.get("n_gpu_layers", 0)),
                slots=entry.capacity,
            ))
        return rows

    @property
    def queued(self) -> int:
        """Requests waiting for a load or a slot."""
        return self._queued

    async def sweep(self) -> int:
        """Unload idle models whose keep-alive has expired (by the injected clock); returns how many."""
        now = self._clock()
        expired = [e for e in self._entries.values()
                   if not e.active and not e.waiting and e.runner is not None and is_expired(e.expires_at, now)]
        for entry in expired:
            self._unload(entry)
        tasks = [e.close_task for e in expired if e.close_task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        return len(expired)

    async def aclose(self) -> None:
        """Unload everything and wait for the runners to stop."""
        for entry in list(self._entries.values()):
            self._unload(entry, force=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------ acquire / release

    async def _acquire(self, spec: ModelSpec, keep: float | None) -> _Entry:
        if self._queued >= self.max_queue:
            raise ServiceBusy()
        self._queued += 1
        deadline = asyncio.get_running_loop().time() + self.wait_timeout
        try:
            while True:
                entry = await self._entry_for(spec, deadline)
                entry.waiting += 1
                acquired = False
                try:
                    load = entry.load
                    assert load is not None
                    # The common case (model loaded, slot free) takes neither a task nor a loop turn.
                    if load.done():
                        load.result()
                    else:
                        await self._until(asyncio.shield(load), deadline)
                    if entry.slots.locked():
                        await self._until(entry.slots.acquire(), deadline)
                    else:
                        await entry.slots.acquire()
                    acquired = True
                finally:
                    entry.waiting -= 1
                    if entry.active == 0 and not entry.closed:
                        if not acquired and entry.draining and entry.waiting == 0:
                            self._unload(entry)
                        else:
                            self._arm(entry)
                if entry.closed:
                    entry.slots.release()
                    continue
                break
        finally:
            self._queued -= 1
        entry.active += 1
        entry.keep_alive = keep
        entry.expires_at = None
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        try:
            assert entry.runner is not None
            if not entry.runner.alive:
                await self._restart(entry, deadline)
        except BaseException:
            self._release(entry, keep, served=False)
            raise
        return entry

    def _release(self, entry: _Entry, keep: float | None, *, served: bool = True) -> None:
        entry.active -= 1
        entry.served += served
        entry.last_used = self._clock()
        entry.slots.release()
        if entry.closed:
            if entry.active == 0:
                self._schedule_close(entry)
        elif entry.active == 0:
            entry.expires_at = None if keep is None else entry.last_used + keep
            if (keep == 0 or entry.draining) and entry.waiting == 0:
                self._unload(entry)
            else:
                self._arm(entry)
        self._notify()

    async def _entry_for(self, spec: ModelSpec, deadline: float) -> _Entry:
        key = spec.key
        while True:
            entry = self._entries.get(key)
            if entry is not None and not entry.draining:
                return entry
            loaded = entry or next((e for e in self._entries.values() if e.spec.name == spec.name), None)
            if loaded is not None:
                # One instance per model name: other load options (or a reload already asked
                # for) wait until the loaded instance has finished what it serves.
                if loaded.spec.key != key and loaded.active == 0 and loaded.waiting == 0:
                    self._unload(loaded)
                    continue
                loaded.draining = loaded.draining or loaded.spec.key != key
                await self._until(self._changed.wait(), deadline)
                continue
            if len(self._entries) + self._closing < self.max_loaded_models:
                return self._create(spec)
            # Runners still closing hold their memory: wait for them rather than evict one more.
            victim = None
            if len(self._entries) >= self.max_loaded_models:
                victim = pick_victim((e.state() for e in self._entries.values()), self._clock())
            if victim is not None:
                self._unload(self._entries[victim])
                continue
            await self._until(self._changed.wait(), deadline)

    def _create(self, spec: ModelSpec) -> _Entry:
        parallel = spec.num_parallel if spec.num_parallel > 1 else self.num_parallel
        spec = replace(spec, num_parallel=parallel)
        entry = _Entry(spec, parallel, self._clock())
        self._entries[spec.key] = entry
        entry.load = self._spawn(self._load(entry))
        return entry

    async def _load(self, entry: _Entry) -> Runner:
        try:
            runner = await self.engine.start(entry.spec)
        except BaseException:
            if self._entries.get(entry.spec.key) is entry:
                del self._entries[entry.spec.key]
            entry.closed = True
            self._notify()
            raise
        entry.runner = runner
        # A runner with one shared KV cache serves more sequences than num_parallel, admitting them by room.
        sequences = int((getattr(runner, "info", None) or {}).get("sequences", 0))
        for _ in range(sequences - entry.capacity):
            entry.slots.release()
        entry.capacity = max(entry.capacity, sequences)
        if entry.closed and entry.active == 0:
            self._schedule_close(entry)
        self._notify()
        return runner

    async def _restart(self, entry: _Entry, deadline: float) -> None:
        async with entry.restart_lock:
            old = entry.runner
            if old is not None and old.alive:
                return  # another request restarted it meanwhile
            if old is not None:
                await self._until(old.close(), deadline)
            entry.runner = await self._until(self.engine.start(entry.spec), deadline)

    # ------------------------------------------------------------ unloading

    def _unload(self, entry: _Entry, *, force: bool = False) -> None:
        if not entry.closed:
            entry.closed = True
            if self._entries.get(entry.spec.key) is entry:
                del self._entries[entry.spec.key]
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        if entry.active == 0 or force:
            self._schedule_close(entry)

    def _schedule_close(self, entry: _Entry) -> None:
        if entry.close_task is not None:
            return
        self._closing += 1
        entry.close_task = self._spawn(self._close(entry))

    async def _close(self, entry: _Entry) -> None:
        try:
            if entry.load is not None and not entry.load.done():
                await asyncio.wait([entry.load], timeout=self.wait_timeout)
            if entry.runner is not None:
                await asyncio.wait_for(entry.runner.close(), 30)
        finally:
            self._closing -= 1
            self._notify()

    def _arm(self, entry: _Entry) -> None:
        """(Re)start the expiry timer of an idle entry."""
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if entry.expires_at is None:
            return
        delay = max(0.0, entry.expires_at - self._clock())
        entry.timer = asyncio.get_running_loop().call_later(delay, self._expire, entry)

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.closed or entry.active or entry.waiting or entry.expires_at is None:
            return
        if is_expired(entry.expires_at, self._clock()):
            self._unload(entry)
        else:
            self._arm(entry)

    # ------------------------------------------------------------ helpers

    def _notify(self) -> None:
        # Waiters hold the old event; swapping wakes all of them exactly once.
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A failed load is reported to its waiters; mark it retrieved so it is not logged again.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _until(self, awaitable: Awaitable[T], deadline: float) -> T:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(awaitable, max(0.0, remaining))
        except TimeoutError:
            raise ServiceBusy("timed out waiting for a model slot") from None
