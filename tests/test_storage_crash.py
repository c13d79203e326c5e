"""Crash consistency: a real process mutating the store is SIGKILLed, then the store is checked."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omx.storage import ModelStore

REPO = Path(__file__).resolve().parents[1]
CS = 64 * 1024


def _run_child(root: Path, scratch: Path, *, crash_at: int | None, seed: int) -> int:
    env = {**os.environ, "OMX_CRASH_SEED": str(seed)}
    if crash_at is not None:
        env["OMX_CRASH_AT"] = str(crash_at)
    with subprocess.Popen(  # leaving the block closes the pipes
        [sys.executable, "-m", "tests.support.storage_crash_child", str(root), str(scratch)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            if crash_at is None:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "started", proc.stderr.read() if proc.stderr else ""
                # A random moment: wherever the child happens to be.
                time.sleep(random.Random(seed).uniform(0.05, 0.6))
                proc.send_signal(signal.SIGKILL)
            return proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _assert_consistent(root: Path, *, deep: bool = False) -> int:
    store = ModelStore(root, chunk_size=CS)
    store.recover()  # as a node does when it starts
    assert store.check_sync(deep=deep) == []
    models = store.list_models_sync()
    for entry in models:
        resolved = store.resolve_sync(entry.name)
        assert resolved.model_path.is_file() and resolved.gguf is not None
        assert resolved.system is not None and resolved.system.startswith("step ")
    for digest in store.blobs.digests():
        assert store.blobs.stored_index(digest) is not None
    return len(models)


# Kill points: the N-th os.replace/os.fsync of the child, spread over its first
# operations (blob writes, create, copy, delete, partial blobs), then random moments.
CRASH_POINTS = [1, 2, 3, 5, 8, 12, 18, 27, 40, 60, 90, 130]


@pytest.mark.e2e
def test_sigkill_at_every_write_step_leaves_a_consistent_store(tmp_path: Path) -> None:
    root, scratch = tmp_path / "store", tmp_path / "scratch"
    scratch.mkdir()
    for i, point in enumerate(CRASH_POINTS):
        rc = _run_child(root, scratch, crash_at=point, seed=i)
        assert rc == -signal.SIGKILL, f"child was not killed at step {point} (rc {rc})"
        _assert_consistent(root)
    for seed in range(100, 103):
        rc = _run_child(root, scratch, crash_at=None, seed=seed)
        assert rc == -signal.SIGKILL
        _assert_consistent(root)
    assert _assert_consistent(root, deep=True) > 0
    # Leftovers of the killed writers were swept by recover.
    assert list((root / "tmp").iterdir()) == []
