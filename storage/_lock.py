"""A store-wide lock held while manifests change or blobs are collected.

``flock`` on ``<root>/.lock`` serialises writers across processes; every
acquisition opens its own file description, so threads of one process also
exclude each other. The kernel drops the lock when its holder dies, so a
crash never leaves the store locked.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["store_lock"]


@contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """Hold the exclusive store lock of ``root`` (blocking)."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
