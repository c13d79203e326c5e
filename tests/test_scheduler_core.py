"""ModelScheduler semantics with the in-process fake engine, and its pure decisions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from omx.errors import EngineError, ServiceBusy
from omx.protocols import Completion, CompletionChunk, ModelSpec
from omx.runtime.engine._fake import FakeEngine, FakeRunner
from omx.runtime.scheduler import ModelScheduler, ModelState, pick_victim, resolve_keep_alive
from omx.types import BlobDigest


def spec(name: str, **kw: object) -> ModelSpec:
    return ModelSpec(name=name, model_path=Path(f"/models/{name}"), digest=BlobDigest("sha256:" + "1" * 64),
                     **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(predicate, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_resolve_keep_alive() -> None:
    assert resolve_keep_alive(None, 300.0) == 300.0
    assert resolve_keep_alive(0, 300.0) == 0
    assert resolve_keep_alive(-1, 300.0) is None
    assert resolve_keep_alive(None, -1) is None
    assert resolve_keep_alive(5, 300.0) == 5.0


def test_pick_victim_prefers_expired_then_lru_and_never_busy() -> None:
    def st(key: str, *, active: int = 0, waiting: int = 0, used: float = 0.0, exp: float | None = None,
           ready: bool = True) -> ModelState:
        return ModelState((key,), ready, active, waiting, used, exp)

    assert pick_victim([st("a", active=1), st("b", waiting=1), st("c", ready=False)], 10) is None
    assert pick_victim([st("a", used=5), st("b", used=3)], 10) == ("b",)
    assert pick_victim([st("a", used=1), st("b", used=3, exp=9)], 10) == ("b",)
    assert pick_victim([st("a", used=1, exp=None), st("b", used=3, exp=11)], 10) == ("a",)


async def test_load_on_demand_and_reuse() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine)
    async with sched.lease(spec("a"), keep_alive=None) as runner:
        items = [i async for i in runner.complete(Completion("one two"))]
        assert [i.text for i in items if isinstance(i, CompletionChunk)] == ["one ", "two "]
    async with sched.lease(spec("a"), keep_alive=None):
        pass
    assert engine.started == ["a"]
    (row,) = sched.loaded()
    assert row.name == "a" and row.requests_served == 2 and row.active_requests == 0
    assert row.expires_at is not None
    await sched.aclose()
    assert engine.closed == ["a"]


async def test_concurrent_requests_share_one_load() -> None:
    engine = FakeEngine(load_delay=0.05)
    sched = ModelScheduler(engine, num_parallel=4)

    async def use() -> None:
        async with sched.lease(spec("a"), keep_alive=None):
            await asyncio.sleep(0)

    await asyncio.gather(*(use() for _ in range(10)))
    assert engine.started == ["a"]
    await sched.aclose()


async def test_keep_alive_zero_unloads_after_the_request() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine)
    async with sched.lease(spec("a"), keep_alive=0):
        assert [m.name for m in sched.loaded()] == ["a"]
    assert sched.loaded() == []
    await until(lambda: engine.closed == ["a"])
    await sched.aclose()


async def test_negative_keep_alive_never_expires_and_expiry_restarts_after_each_request() -> None:
    clock = Clock()
    engine = FakeEngine()
    sched = ModelScheduler(engine, clock=clock, wall_clock=clock)
    async with sched.lease(spec("forever"), keep_alive=-1):
        pass
    async with sched.lease(spec("brief"), keep_alive=10):
        pass
    rows = {m.name: m for m in sched.loaded()}
    assert rows["forever"].expires_at is None
    assert rows["brief"].expires_at == pytest.approx(clock.now + 10)
    clock.now += 8
    async with sched.lease(spec("brief"), keep_alive=10):
        pass  # the expiry restarts from here
    clock.now += 8
    assert await sched.sweep() == 0
    clock.now += 3
    assert await sched.sweep() == 1
    assert [m.name for m in sched.loaded()] == ["forever"]
    clock.now += 10**6
    assert await sched.sweep() == 0
    await sched.aclose()


async def test_expiry_timer_unloads_idle_model() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine)
    async with sched.lease(spec("a"), keep_alive=0.05):
        pass
    await until(lambda: sched.loaded() == [] and engine.closed == ["a"])
    await sched.aclose()


async def test_max_loaded_evicts_least_recently_used_idle_model() -> None:
    engine = FakeEngine()
    clock = Clock()
    sched = ModelScheduler(engine, max_loaded_models=2, clock=clock)
    for name in ("a", "b"):
        async with sched.lease(spec(name), keep_alive=None):
            clock.now += 1
    async with sched.lease(spec("a"), keep_alive=None):  # a is now the most recently used
        clock.now += 1
    async with sched.lease(spec("c"), keep_alive=None):
        pass
    assert sorted(m.name for m in sched.loaded()) == ["a", "c"]
    assert engine.closed == ["b"]
    await sched.aclose()


async def test_eviction_waits_while_every_model_is_busy() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine, max_loaded_models=1)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with sched.lease(spec("a"), keep_alive=None):
            entered.set()
            await asyncio.wait_for(release.wait(), 20)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 20)
    waiter = asyncio.create_task(sched.load(spec("b"), keep_alive=None))
    await until(lambda: sched.queued == 1)
    assert engine.started == ["a"]
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, waiter), 20)
    assert engine.started == ["a", "b"] and engine.closed == ["a"]
    await sched.aclose()


async def test_num_parallel_bounds_concurrent_leases() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine, num_parallel=2)
    inside = 0
    peak = 0

    async def use() -> None:
        nonlocal inside, peak
        async with sched.lease(spec("a"), keep_alive=None):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(use() for _ in range(8)))
    assert peak == 2
    assert engine.runners[0].spec.num_parallel == 2
    await sched.aclose()


async def test_a_runner_with_more_sequences_than_num_parallel_gets_that_many_leases() -> None:
    class SharedCacheEngine(FakeEngine):
        async def start(self, spec: ModelSpec) -> FakeRunner:
            runner = await super().start(spec)
            runner.info = {"sequences": 5}  # type: ignore[attr-defined]
            return runner

    sched = ModelScheduler(SharedCacheEngine(), num_parallel=2)
    inside = 0
    peak = 0
    release = asyncio.Event()

    async def use() -> None:
        nonlocal inside, peak
        async with sched.lease(spec("a"), keep_alive=None):
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1

    users = [asyncio.ensure_future(use()) for _ in range(8)]
    await until(lambda: inside == 5)
    assert sched.loaded()[0].slots == 5 and sched.queued == 3
    release.set()
    await asyncio.gather(*users)
    assert peak == 5
    await sched.aclose()


async def test_full_queue_answers_service_busy() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine, num_parallel=1, max_queue=2)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with sched.lease(spec("a"), keep_alive=None):
            entered.set()
            await asyncio.wait_for(release.wait(), 20)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 20)
    queued = [asyncio.create_task(sched.load(spec("a"), keep_alive=None)) for _ in range(2)]
    await until(lambda: sched.queued == 2)
    with pytest.raises(ServiceBusy):
        async with sched.lease(spec("a"), keep_alive=None):
            pass
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, *queued), 20)
    await sched.aclose()


async def test_wait_timeout_answers_service_busy() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine, wait_timeout=0.05)
    async with sched.lease(spec("a"), keep_alive=None):
        with pytest.raises(ServiceBusy, match="timed out"):
            async with sched.lease(spec("a"), keep_alive=None):
                pass
    await sched.aclose()


async def test_failed_load_reaches_every_waiter_and_is_retried_later() -> None:
    engine = FakeEngine(load_delay=0.02, fail={"bad"})
    sched = ModelScheduler(engine)
    results = await asyncio.gather(*(sched.load(spec("bad"), keep_alive=None) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, EngineError) for r in results)
    assert engine.started == ["bad"]
    engine.fail.clear()
    await sched.load(spec("bad"), keep_alive=None)
    assert engine.started == ["bad", "bad"]
    await sched.aclose()


async def test_crashed_runner_is_restarted_on_next_lease() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine)
    async with sched.lease(spec("a"), keep_alive=None) as runner:
        runner.crash()  # type: ignore[attr-defined]
    async with sched.lease(spec("a"), keep_alive=None) as runner2:
        assert runner2 is not runner and runner2.alive
    assert engine.started == ["a", "a"]
    await sched.aclose()


async def test_unload_by_name_waits_for_in_flight_request() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine)
    async with sched.lease(spec("a"), keep_alive=None):
        assert await sched.unload("a") is True
        assert engine.closed == []
    await until(lambda: engine.closed == ["a"])
    assert await sched.unload("a") is False
    await sched.aclose()


async def test_other_load_options_reload_the_one_instance_of_a_name() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine)
    await sched.load(spec("a", num_ctx=512), keep_alive=None)
    await sched.load(spec("a", num_ctx=1024), keep_alive=None)
    assert [(m.name, m.context_length) for m in sched.loaded()] == [("a", 1024)]
    assert engine.started == ["a", "a"]
    await until(lambda: engine.closed == ["a"])
    assert engine.runners[0].closed and not engine.runners[1].closed
    assert await sched.unload("a")
    assert sched.loaded() == []
    await sched.aclose()


async def test_reload_with_other_options_waits_for_the_busy_instance() -> None:
    engine = FakeEngine()
    sched = ModelScheduler(engine, num_parallel=2)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with sched.lease(spec("a", num_ctx=512), keep_alive=None):
            entered.set()
            await asyncio.wait_for(release.wait(), 20)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 20)
    other = asyncio.create_task(sched.load(spec("a", num_ctx=1024), keep_alive=None))
    await until(lambda: sched.queued == 1)
    # The old instance drains: a request with its own options, a free slot and all, waits too.
    same = asyncio.create_task(sched.load(spec("a", num_ctx=512), keep_alive=None))
    await until(lambda: sched.queued == 2)
    assert engine.started == ["a"]
    assert [m.context_length for m in sched.loaded()] == [512]
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, other, same), 20)
    assert len(sched.loaded()) == 1
    assert engine.started == ["a", "a", "a"]
    await sched.aclose()


async def test_alternating_load_options_all_complete_with_one_instance_listed() -> None:
    engine = FakeEngine(load_delay=0.01)
    sched = ModelScheduler(engine, num_parallel=2)
    listed: list[int] = []

    async def use(ctx: int) -> None:
        async with sched.lease(spec("a", num_ctx=ctx), keep_alive=None) as runner:
            listed.append(len(sched.loaded()))
            assert runner.spec.num_ctx == ctx  # type: ignore[attr-defined]
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(use(512 if i % 2 else 1024) for i in range(12))), 20)
    assert listed == [1] * 12
    assert len(sched.loaded()) == 1
    await sched.aclose()
