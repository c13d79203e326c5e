"""Crash-safe file writes: temp file + fsync + rename + directory fsync.

A reader never sees a half-written file: it sees the old state or the complete new file.
The temp file lives in the destination's folder (or a ``tmp_dir`` the caller names on the
same filesystem, such as the store's ``tmp/``, which its recovery sweeps), so ``os.replace``
is atomic. Temp names are ``.<stem>.<pid>.<random>.tmp``: a sweeper can tell whose they are.
Every layer writes through these functions.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "publish", "temp_path"]


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (a rename or unlink) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(folder: Path, stem: str) -> Path:
    """A fresh, unique temp file path in ``folder`` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".{stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def publish(tmp: Path, dest: Path) -> None:
    """Atomically move a fully written and fsynced ``tmp`` file to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def atomic_write(dest: Path, data: bytes | str, *, mode: int | None = None, tmp_dir: Path | None = None,
                 exclusive: bool = False, check: Callable[[Path], object] | None = None) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``dest``: a crash leaves the old file or the new one.

    ``mode`` (exact, whatever the umask) is set from the moment the temp file exists, so a
    secret written with ``0o600`` is never readable by others; without it the umask decides,
    as for :func:`open`. ``check`` is called with the complete temp file before it takes
    ``dest``'s place; an exception from it leaves ``dest`` untouched. With ``exclusive`` an
    existing ``dest`` is left alone and :class:`FileExistsError` raised, also when another
    writer creates it first (the temp file is linked, not renamed, into place).
    """
    raw = data.encode() if isinstance(data, str) else data
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(tmp_dir if tmp_dir is not None else dest.parent, dest.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as out:
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        if check is not None:
            check(tmp)
        if exclusive:
            os.link(tmp, dest)
            os.unlink(tmp)
            fsync_dir(dest.parent)
        else:
            publish(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
