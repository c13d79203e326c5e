"""A small, really full disk for tests: a tmpfs of a given size (needs root), and a filler file."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["fill", "mount_tmpfs", "unmount"]


def mount_tmpfs(path: Path, size: int) -> None:
    """Mount a tmpfs of ``size`` bytes on ``path``; skip (fail under ``CI=true``) where that is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True, timeout=30, check=False)
        problem = result.stderr.strip() if result.returncode else ""
    except OSError as exc:
        problem = str(exc)
    if not problem:
        return
    message = f"cannot mount a small tmpfs for the full-disk tests (run as root): {problem}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def fill(disk: Path, leave: int = 16 * 1024) -> Path:
    """Write a file on ``disk`` until at most ``leave`` bytes are free (less than one chunk)."""
    filler = disk / "filler"
    with open(filler, "ab") as f:
        while (free := shutil.disk_usage(disk).free) > leave:
            try:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler
