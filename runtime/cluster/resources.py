"""Resource sampling with psutil, done when asked so an idle node never pays it.

CPU use is ``psutil.cpu_percent(interval=None)`` between two samples (the
first call primes it), so it covers the time since the previous ask; memory
is the machine's; disk is the filesystem of the model store. A sample (a few
small ``/proc`` reads) is taken when :attr:`ResourceSampler.latest` is read and
the last one is older than ``period_s``. Connections (this process's
established TCP connections on the API port) are counted the same way
(:meth:`ResourceSampler.current_connections`): that count reads every TCP
socket of the host, which grows with the cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import psutil

from omx.functions.cluster_view import Resources

__all__ = ["ResourceSampler"]

log = logging.getLogger(__name__)


class ResourceSampler:
    """Samples :attr:`latest` and :attr:`connections` when they are read and older than ``period_s``."""

    def __init__(self, store_path: Path, *, period_s: float = 2.0) -> None:
        self.store_path = store_path
        self.period_s = period_s
        self.api_port: int | None = None
        self._process = psutil.Process(os.getpid())
        psutil.cpu_percent(interval=None)  # prime: the next call measures from here
        self._latest: Resources = self._sample_resources()
        self._sampled_at = time.monotonic()
        self.connections = 0
        self._counted_at = float("-inf")

    @property
    def latest(self) -> Resources:
        """The last sample, taken now if it is older than ``period_s`` (blocking, but only small reads)."""
        if time.monotonic() - self._sampled_at >= self.period_s:
            self.sample()
        return self._latest

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
        """Take one sample now (a failed one keeps the previous)."""
        self._sampled_at = time.monotonic()
        try:
            self._latest = self._sample_resources()
        except Exception:  # noqa: BLE001 - psutil or the disk may fail; the previous figures stay
            log.exception("resource sampling failed")

    def current_connections(self) -> int:
        """Established connections on the API port, counted now unless counted within ``period_s``."""
        now = time.monotonic()
        if now - self._counted_at >= self.period_s:
            self.connections = self._count_connections()
            self._counted_at = now
        return self.connections
