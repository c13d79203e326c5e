"""Resource sampling with psutil, in the background so handlers read a cached value.

CPU use is ``psutil.cpu_percent(interval=None)`` between two samples (the
first call primes it); memory is the machine's; disk is the filesystem of the
model store; connections are this process's established TCP connections on
the API port. Sampling runs in a thread (``/proc`` reads) every ``period_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path

import psutil

from omx.functions.cluster_view import Resources

__all__ = ["ResourceSampler"]

log = logging.getLogger(__name__)


class ResourceSampler:
    """Keeps :attr:`latest` and :attr:`connections` fresh while started."""

    def __init__(self, store_path: Path, *, period_s: float = 2.0) -> None:
        self.store_path = store_path
        self.period_s = period_s
        self.api_port: int | None = None
        self._process = psutil.Process(os.getpid())
        psutil.cpu_percent(interval=None)  # prime: the next call measures from here
        self.latest: Resources = self._sample_resources()
        self.connections = 0
        self._task: asyncio.Task[None] | None = None

    def _sample_resources(self) -> Resources:
        cpu = psutil.cpu_percent(interval=None) / 100.0
        mem = psutil.virtual_memory()
        try:
            disk = shutil.disk_usage(self.store_path)
            disk_used, disk_total = disk.used, disk.total
        except OSError:
            disk_used = disk_total = 0
        return Resources(
            cpu=min(1.0, max(0.0, cpu)),
            memory=(mem.total - mem.available) / mem.total if mem.total else 0.0,
            disk=disk_used / disk_total if disk_total else 0.0,
            cpu_count=psutil.cpu_count() or 1,
            memory_used=mem.total - mem.available,
            memory_total=mem.total,
            disk_used=disk_used,
            disk_total=disk_total,
        )

    def _count_connections(self) -> int:
        if self.api_port is None:
            return 0
        try:
            conns = self._process.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            return self.connections
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr
                   and c.laddr.port == self.api_port)

    def sample(self) -> None:
        """Take one sample now (blocking; run it in a thread)."""
        self.latest = self._sample_resources()
        self.connections = self._count_connections()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="resource-sampler")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sample)
            except Exception:  # noqa: BLE001 - a failed sample keeps the previous one
                log.exception("resource sampling failed")
            await asyncio.sleep(self.period_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
