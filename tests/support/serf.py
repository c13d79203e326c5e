"""Helpers for tests that run real Serf agents.

Serf tests skip when the binary is missing, except under ``CI=true`` where
they fail: CI must never silently lose the membership tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

__all__ = ["require_serf", "serf_pids"]


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
