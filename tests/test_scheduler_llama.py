"""ModelScheduler end to end with real llama-cpp-python runners on tiny GGUF models."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

from omx.errors import RunnerCrashed
from omx.protocols import Completion, CompletionChunk, CompletionDone, ModelSpec, SamplingOptions
from omx.runtime.engine import LlamaCppEngine, ProcessRunner
from omx.runtime.scheduler import ModelScheduler
from omx.types import BlobDigest
from tests.support.tiny_gguf import write_tiny_llama

GREEDY = SamplingOptions(temperature=0.0, num_predict=16)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sched-gguf")
    return [write_tiny_llama(root / f"m{i}.gguf", seed=10 + i, n_ctx=512) for i in range(3)]


def spec(path: Path, **kw: object) -> ModelSpec:
    return ModelSpec(name=path.stem, model_path=path, digest=BlobDigest("sha256:" + "2" * 64), num_ctx=256,
                     num_thread=1, **kw)  # type: ignore[arg-type]


async def generate(runner: object, prompt: str, opts: SamplingOptions = GREEDY) -> tuple[str, CompletionDone]:
    assert isinstance(runner, ProcessRunner)
    text, done = [], None
    async for item in runner.complete(Completion(prompt, opts)):
        if isinstance(item, CompletionChunk):
            text.append(item.text)
        else:
            done = item
    assert done is not None
    return "".join(text), done


async def until(predicate, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_load_evict_and_keep_alive_zero(paths: list[Path]) -> None:
    sched = ModelScheduler(LlamaCppEngine(), max_loaded_models=2)
    try:
        pids = {}
        for path in paths[:2]:
            async with sched.lease(spec(path), keep_alive=None) as runner:
                assert isinstance(runner, ProcessRunner)
                pids[path.stem] = runner.pid
                _, done = await generate(runner, "hello world")
                assert done.eval_count == 16
        async with sched.lease(spec(paths[2]), keep_alive=0) as runner:
            _, done = await generate(runner, "hello world")
            assert sorted(m.name for m in sched.loaded()) == ["m1", "m2"]  # m0 was least recently used
        await until(lambda: not psutil.pid_exists(pids["m0"]) or psutil.Process(pids["m0"]).status() == "zombie")
        assert [m.name for m in sched.loaded()] == ["m1"]  # keep_alive 0 unloaded m2
    finally:
        await sched.aclose()
    assert sched.loaded() == []
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


async def test_parallel_leases_share_one_runner(paths: list[Path]) -> None:
    sched = ModelScheduler(LlamaCppEngine(), num_parallel=2)
    try:
        async def one(prompt: str) -> tuple[int, str]:
            async with sched.lease(spec(paths[0]), keep_alive=None) as runner:
                text, _ = await generate(runner, prompt)
                return runner.pid, text  # type: ignore[attr-defined]

        results = await asyncio.gather(*(one(p) for p in ["hello", "the sky", "hello", "the sky"]))
        assert len({pid for pid, _ in results}) == 1
        assert results[0][1] == results[2][1] and results[1][1] == results[3][1]
        assert sched.loaded()[0].requests_served == 4
    finally:
        await sched.aclose()


async def test_killed_runner_fails_request_and_is_restarted(paths: list[Path]) -> None:
    sched = ModelScheduler(LlamaCppEngine())
    try:
        async with sched.lease(spec(paths[1]), keep_alive=None) as runner:
            first, _ = await generate(runner, "hello")
            with pytest.raises(RunnerCrashed):
                async for _ in runner.complete(Completion("hello", SamplingOptions(temperature=0, num_predict=-1))):
                    os.kill(runner.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        async with sched.lease(spec(paths[1]), keep_alive=None) as again:
            assert again is not runner and again.alive
            text, _ = await generate(again, "hello")
            assert text == first
    finally:
        await sched.aclose()
