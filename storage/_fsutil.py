"""Crash-safe file primitives: every write is temp + fsync + rename + directory fsync.

A reader never sees a half-written file: it sees either the old name-less state or the
complete new file. Temp files live under ``<root>/tmp/`` (same filesystem as their
destination, so ``os.replace`` is atomic) and are swept by ``ModelStore.recover``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["TMP_DIR", "atomic_write_bytes", "fsync_dir", "publish", "temp_path"]

TMP_DIR = "tmp"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (a rename or unlink) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(root: Path, stem: str) -> Path:
    """A fresh, unique temp file path under ``<root>/tmp/`` (the folder is created)."""
    tmp = root / TMP_DIR
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp / f"{stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def publish(tmp: Path, dest: Path) -> None:
    """Atomically move a fully written and fsynced ``tmp`` file to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def atomic_write_bytes(root: Path, dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` so that a crash leaves either the old file or the new one."""
    tmp = temp_path(root, dest.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
