"""A process that mutates a model store forever, for the crash-consistency test.

Run as ``python -m tests.support.storage_crash_child ROOT``. With
``OMX_CRASH_AT=N`` it SIGKILLs itself at the N-th call of ``os.replace`` or
``os.fsync`` (the points where a write becomes durable or visible), which
lands the kill exactly between the steps of a write. Without it, the parent
kills it at a random moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from omx.storage import ModelStore, PartialBlob, parse_digest
from tests.support.storage_gguf import write_gguf

CS = 64 * 1024
_calls = 0
_crash_at = int(os.environ.get("OMX_CRASH_AT", "0"))


def _wrap(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _calls
        _calls += 1
        if _crash_at and _calls == _crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


os.replace = _wrap(os.replace)
os.fsync = _wrap(os.fsync)


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), 300_000):
        yield data[i:i + 300_000]


async def main(root: Path, scratch: Path) -> None:
    rng = random.Random(int(os.environ.get("OMX_CRASH_SEED", "0")))
    store = ModelStore(root, chunk_size=CS)
    print("started", flush=True)
    step = 0
    while True:
        step += 1
        gguf_path = write_gguf(scratch / f"m{step % 4}.gguf", seed=rng.randrange(1000))
        data = gguf_path.read_bytes()
        digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
        await store.blobs.write(_pieces(data), expected=digest)
        name = f"model{step % 5}"
        async for _ in store.create(name, {"files": {"m.gguf": digest}, "system": f"step {step}",
                                           "parameters": {"temperature": rng.random()}}):
            pass
        big = os.urandom(rng.randrange(1, 3 << 20))
        await store.blobs.write(_pieces(big))
        models = [e.name for e in await store.list_models()]
        if models:
            await store.copy(rng.choice(models), f"copy{step % 3}")
        if len(models) > 3:
            await store.delete(rng.choice(models))
        part_data = os.urandom(3 * CS + 7)
        part_digest = parse_digest("sha256:" + hashlib.sha256(part_data).hexdigest())
        part = PartialBlob.open(store.blobs, part_digest, len(part_data))
        for i in part.missing()[:2]:
            off, n = part.chunk_range(i)
            part.write_chunk(i, part_data[off:off + n])
        if step % 2:
            for i in part.missing():
                off, n = part.chunk_range(i)
                part.write_chunk(i, part_data[off:off + n])
            part.finish()
        print("step", step, flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
