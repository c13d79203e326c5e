"""A full disk, said clearly: the room check before a transfer, and the error an ENOSPC becomes.

Transfers into the store (models fetched from peers) check the free space of the
store's filesystem against the bytes they still lack before they write anything
(:func:`require_room`), and a write that fails because the disk or a quota is full
becomes a :class:`~omx.errors.StoreError` that says so (:func:`disk_error`) instead of
an ``OSError`` that reaches the client as an internal error. The check is advisory:
other writers share the disk, so a transfer can still meet a full disk while it runs.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from omx.errors import StoreError

__all__ = ["DISK_FULL_ERRNOS", "disk_error", "format_bytes", "free_bytes", "is_disk_full", "require_room"]

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``No space left on device`` and ``Disk quota exceeded``."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused because the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def free_bytes(root: Path) -> int:
    """Free bytes on the filesystem of ``root`` (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


def format_bytes(n: int) -> str:
    """``512 B``, ``64.0 KiB``, ``1.5 MiB``, ``2.0 GiB``."""
    if n < 1024:
        return f"{n} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    value, unit = n / 1024, 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.1f} {units[unit]}"


def disk_error(exc: OSError, what: str, root: Path) -> StoreError:
    """The error to report when writing ``what`` (e.g. ``"blob sha256:…"``) under the store ``root`` failed."""
    if is_disk_full(exc):
        return StoreError(f"no space left on the model store's disk ({root}: {format_bytes(free_bytes(root))} free) "
                          f"while writing {what}")
    return StoreError(f"cannot write {what} to the model store ({root}): {exc.strerror or exc}")


def require_room(root: Path, need: int, what: str) -> None:
    """Raise :class:`StoreError` unless the store ``root``'s filesystem has ``need`` bytes free for ``what``."""
    free = free_bytes(root)
    if need > free:
        raise StoreError(f"not enough disk space for {what}: it needs {format_bytes(need)}, the model store's "
                         f"disk ({root}) has {format_bytes(free)} free")
