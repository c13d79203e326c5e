"""Helpers for tests that run real Serf agents.

Serf tests skip when the binary is missing, except under ``CI=true`` where
they fail: CI must never silently lose the membership tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable

import pytest

__all__ = ["eventually", "require_serf", "serf_pids"]


def require_serf() -> None:
    """Skip (or fail under ``CI=true``) when the ``serf`` binary is not installed."""
    if shutil.which("serf") is not None:
        return
    message = "the serf binary is not installed (Debian package 'serf')"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def serf_pids(marker: str) -> list[int]:
    """PIDs of serf agents whose command line contains ``marker`` (e.g. a tmp path)."""
    out = subprocess.run(["pgrep", "-f", f"serf agent.*{marker}"], capture_output=True, text=True,
                         check=False, timeout=10)
    return [int(p) for p in out.stdout.split()]


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str,
                     deadline_s: float = 30.0) -> None:
    """Poll ``check`` (sync or async) until true; fail with ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline_s:g}s: {what}")
        await asyncio.sleep(0.1)
