"""The functions a node serves now: one pool per (function, version), swapped atomically.

:class:`Serving` maps each path to the :class:`Served` function behind it. A
redeploy or rollback puts a new :class:`Served` in place in one assignment;
the old one is *retired*: it takes no new call, and its pool is closed once
the calls it already runs have finished (they finish on the old version, so
no call fails because of a swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Pool", "Served", "Serving"]

log = logging.getLogger("omx.functions")


class Pool(Protocol):
    """What the host needs of a sandbox pool (``omx.runtime.sandbox.FunctionPool``)."""

    async def call(self, body: Any, headers: Mapping[str, str]) -> Any:
        ...

    async def aclose(self) -> None:
        ...


@dataclass(eq=False)
class Served:
    """One function version served here; ``active`` counts its calls (and streams) under way."""

    name: str
    version: str
    path: str
    methods: tuple[str, ...]
    spec: Mapping[str, Any]
    pool: Pool
    active: int = 0
    retired: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Serving:
    """Paths to served functions, and the retirement of replaced ones."""

    def __init__(self) -> None:
        self.by_name: dict[str, Served] = {}
        self.by_path: dict[str, Served] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._waiting: set[Served] = set()
        """Retired functions whose calls are still running."""

    def lookup(self, path: str) -> Served | None:
        return self.by_path.get(path)

    def put(self, served: Served) -> None:
        """Serve ``served`` from now on, in place of whatever had its name or path."""
        old = self.by_name.get(served.name)
        if old is not None:
            self.by_path.pop(old.path, None)
        clash = self.by_path.get(served.path)
        self.by_name[served.name] = served
        self.by_path[served.path] = served
        for gone in (old, clash):
            if gone is not None and gone is not served:
                if clash is gone and gone.name != served.name:
                    self.by_name.pop(gone.name, None)
                self.retire(gone)

    def drop(self, name: str) -> None:
        served = self.by_name.pop(name, None)
        if served is not None:
            if self.by_path.get(served.path) is served:
                del self.by_path[served.path]
            self.retire(served)

    def begin(self, served: Served) -> None:
        served.active += 1

    def end(self, served: Served) -> None:
        served.active -= 1
        if served.retired and served.active == 0 and served in self._waiting:
            self._waiting.discard(served)
            self._close(served)

    def retire(self, served: Served) -> None:
        if served.retired:
            return
        served.retired = True
        if served.active == 0:
            self._close(served)
        else:
            self._waiting.add(served)

    def _close(self, served: Served) -> None:
        task = asyncio.create_task(self._aclose(served), name=f"function-retire-{served.name}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _aclose(served: Served) -> None:
        try:
            await served.pool.aclose()
        except Exception:  # noqa: BLE001 - a pool that fails to stop must not stop the others
            log.exception("pool of %s %s did not close cleanly", served.name, served.version[:12])
        finally:
            served.closed.set()

    async def aclose(self) -> None:
        """Retire everything and wait for every pool to close."""
        for name in list(self.by_name):
            self.drop(name)
        for served in list(self._waiting):  # shutting down: the pools drain what still runs
            self._waiting.discard(served)
            self._close(served)
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._closing, return_exceptions=True)
