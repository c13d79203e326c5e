"""The custom-function sandbox against real bubblewrap workers: calls, streaming, context, and abuse.

The node side is a small :class:`ContextHost` double (it answers ``ctx.generate``
and collects logs); everything else is real: the workers run in bubblewrap
with their limits, and the abuse cases really loop, allocate, crash and fork.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from omx.errors import ModelNotFound
from omx.functions import Context, FunctionSpec, function
from omx.runtime.sandbox import (
    DeployError,
    FunctionError,
    FunctionPool,
    filter_headers,
    inspect_source,
    probe_sandbox,
    sandbox_problem,
)
from omx.runtime.sandbox._bwrap import Limits, sandbox_command

SOURCE = '''
import asyncio
import ctypes
import os
import time

from pydantic import BaseModel

from omx.functions import Context, function

TOKEN = os.urandom(8).hex()


class Greeting(BaseModel):
    name: str
    times: int = 1


@function
async def echo(body: dict, ctx: Context) -> dict:
    return {"body": body, "token": TOKEN, "node": ctx.node, "headers": dict(ctx.headers)}


@function(name="sync-add", path="/fn/math/add")
def sync_add(body: dict) -> int:
    return body["a"] + body["b"]


@function
def greet(body: Greeting, ctx: Context) -> dict:
    return {"text": " ".join(["hello " + body.name] * body.times)}


@function
async def count(body: dict, ctx: Context):
    for i in range(body["n"]):
        yield {"i": i}


@function
def count_sync(body, ctx):
    yield from range(3)


@function(concurrency=1)
async def ask(body: dict, ctx: Context) -> dict:
    ctx.log("asking", body["model"])
    print("printed too")
    return {"answer": await ctx.generate(model=body["model"], prompt=body["prompt"])}


@function(concurrency=3)
async def hold(body: dict, ctx: Context) -> dict:
    return await ctx.generate(model=body.get("model", "hold"), prompt=body.get("prompt", ""))


@function(timeout=1)
async def drip(body, ctx):
    yield "first"
    while True:
        pass


@function(timeout=1)
def spin(body, ctx):
    while body.get("loop"):
        pass
    return "done"


@function(memory_mb=128)
def hog(body, ctx):
    blocks = []
    while True:
        blocks.append(bytearray(8 * 2**20))


@function
def leave(body, ctx):
    if body.get("exit"):
        os._exit(7)
    return "stayed"


@function
def crash(body, ctx):
    if body.get("crash"):
        ctypes.string_at(0)
    return "fine"


@function
def peek(body, ctx):
    try:
        with open(body["path"], "rb") as fh:
            return {"read": fh.read().hex()}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


@function
def environment(body, ctx):
    return dict(os.environ)


@function(timeout=5)
def forks(body, ctx):
    made = 0
    for _ in range(2000):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    return {"forks": made}


@function(timeout=2)
def bomb(body, ctx):
    while body.get("bomb"):
        os.fork()
    return "calm"
'''


class Host:
    """The node's side of the context: answers model calls, holds them when asked, keeps the logs."""

    node_id = "node-test"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.logs: list[tuple[str, str]] = []
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.holding = 0

    async def model_call(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((kind, body))
        if body.get("model") == "missing":
            raise ModelNotFound("missing")
        if body.get("model") == "hold":
            self.holding += 1
            self.held.set()
            await self.release.wait()
        return {"model": body["model"], "response": f"answer to {body['prompt']}", "done": True}

    def log(self, function: str, line: str) -> None:
        self.logs.append((function, line))


@pytest.fixture(scope="module")
def specs() -> dict[str, FunctionSpec]:
    assert sandbox_problem() is None, sandbox_problem()  # bubblewrap is part of the setup: fail, never skip
    return {spec.name: spec for spec in asyncio.run(inspect_source("abuse.py", SOURCE))}


@asynccontextmanager
async def pool_of(spec: FunctionSpec, host: Host | None = None, **kwargs: Any) -> AsyncIterator[FunctionPool]:
    pool = FunctionPool(filename="abuse.py", source=SOURCE, spec=spec, host=host or Host(), **kwargs)
    try:
        yield pool
    finally:
        await pool.aclose()


async def call_status(pool: FunctionPool, body: Any) -> tuple[int, str]:
    with pytest.raises(FunctionError) as info:
        await pool.call(body, {})
    return info.value.status, info.value.message


# ------------------------------------------------------------------ authoring and deploy


def test_inspect_lists_every_function(specs: dict[str, FunctionSpec]) -> None:
    assert specs["sync-add"] == FunctionSpec(name="sync-add", path="/fn/math/add", qualname="sync_add")
    assert specs["spin"].timeout == 1.0 and specs["hog"].memory_mb == 128 and specs["ask"].concurrency == 1
    assert FunctionSpec.from_json(specs["echo"].to_json()) == specs["echo"]


def test_decorator_validates_its_arguments() -> None:
    def handler(body: dict[str, Any], ctx: Context) -> None:
        return None

    assert function(handler) is handler and handler.__omx_function__.path == "/fn/handler"  # type: ignore[attr-defined]
    for bad in ({"timeout": 0}, {"memory_mb": 8}, {"concurrency": 65}, {"methods": ("BREW",)},
                {"path": "/api/x"}, {"path": "/fn/../x"}, {"name": "Upper"}):
        with pytest.raises(ValueError):
            function(**bad)(handler)  # type: ignore[call-overload]


@pytest.mark.parametrize(("source", "line", "words"), [
    ("from omx.functions import function\n\n@function\ndef f(body:\n    return 1\n", 4, "SyntaxError"),
    ("import os\nimport no_such_module_here\n", 2, "ModuleNotFoundError"),
    ("from omx.functions import function\n\n@function(timeout=-1)\ndef f(body):\n    return 1\n", 3, "timeout"),
    ("x = 1\n", None, "no function"),
    ("import pydantic\nfrom omx.functions import function\n\n@function(memory_mb=16)\ndef f(body):\n    return 1\n",
     4, "memory_mb=16"),
])
async def test_a_file_that_does_not_load_is_refused_with_its_line(source: str, line: int | None,
                                                                  words: str) -> None:
    with pytest.raises(DeployError) as info:
        await inspect_source("broken.py", source)
    assert info.value.line == line and words in info.value.message
    assert info.value.status == 400


def test_a_missing_bubblewrap_is_reported() -> None:
    problem = probe_sandbox("/nonexistent/bwrap")
    assert problem is not None and "bubblewrap is not installed" in problem


def test_headers_lose_credentials() -> None:
    kept = filter_headers({"Authorization": "Bearer k", "X-Api-Key": "k", "Cookie": "c", "X-Omx-Hop": "1",
                           "Content-Type": "application/json"})
    assert kept == {"content-type": "application/json"}


# ------------------------------------------------------------------ calls


async def test_warm_calls_reuse_one_worker(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["echo"]) as pool:
        first = (await pool.call({"x": 1}, {"Authorization": "Bearer secret", "X-Trace": "t1"})).value
        second = (await pool.call({"x": 2}, {})).value
        assert first["body"] == {"x": 1} and second["body"] == {"x": 2}
        assert first["token"] == second["token"] and pool.workers == 1
        assert first["node"] == "node-test" and first["headers"] == {"x-trace": "t1"}


async def test_a_sync_handler_without_context(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["sync-add"]) as pool:
        assert (await pool.call({"a": 2, "b": 3}, {})).value == 5


async def test_a_pydantic_body_is_validated(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["greet"]) as pool:
        assert (await pool.call({"name": "ada", "times": 2}, {})).value == {"text": "hello ada hello ada"}
        status, message = await call_status(pool, {"times": 2})
        assert status == 400 and "name" in message and "Field required" in message
        assert (await pool.call({"name": "bob"}, {})).value == {"text": "hello bob"}


async def test_generators_stream_their_items(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["count"]) as pool:
        result = await pool.call({"n": 4}, {})
        assert result.stream is not None
        assert [item async for item in result.stream] == [{"i": i} for i in range(4)]
        again = await pool.call({"n": 1}, {})
        assert again.stream is not None and [item async for item in again.stream] == [{"i": 0}]
    async with pool_of(specs["count_sync"]) as pool:
        result = await pool.call({}, {})
        assert result.stream is not None and [item async for item in result.stream] == [0, 1, 2]


async def test_context_calls_and_logs_go_through_the_host(specs: dict[str, FunctionSpec]) -> None:
    host = Host()
    async with pool_of(specs["ask"], host) as pool:
        result = await pool.call({"model": "tiny", "prompt": "hi"}, {})
        assert result.value == {"answer": {"model": "tiny", "response": "answer to hi", "done": True}}
        assert host.calls == [("generate", {"model": "tiny", "prompt": "hi", "stream": False})]
        assert ("ask", "asking tiny") in host.logs and ("ask", "printed too") in host.logs


async def test_calls_over_the_concurrency_limit_wait_then_get_429(specs: dict[str, FunctionSpec]) -> None:
    host = Host()
    async with pool_of(specs["ask"], host, queue_wait_s=0.2) as pool:
        held = asyncio.create_task(pool.call({"model": "hold", "prompt": "wait"}, {}))
        async with asyncio.timeout(20):
            await host.held.wait()
        status, message = await call_status(pool, {"model": "tiny", "prompt": "second"})
        assert status == 429 and "busy" in message
        host.release.set()
        assert (await held).value["answer"]["response"] == "answer to wait"
        assert (await pool.call({"model": "tiny", "prompt": "third"}, {})).value["answer"]["response"]


async def test_a_waiting_call_gets_the_slot_when_it_frees(specs: dict[str, FunctionSpec]) -> None:
    host = Host()
    async with pool_of(specs["ask"], host, queue_wait_s=30) as pool:
        held = asyncio.create_task(pool.call({"model": "hold", "prompt": "first"}, {}))
        async with asyncio.timeout(20):
            await host.held.wait()
        waiting = asyncio.create_task(pool.call({"model": "tiny", "prompt": "second"}, {}))
        await asyncio.sleep(0)
        assert not waiting.done()
        host.release.set()
        assert (await held).value and (await waiting).value["answer"]["response"] == "answer to second"


async def test_a_failed_model_call_keeps_its_status(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["ask"]) as pool:
        status, message = await call_status(pool, {"model": "missing", "prompt": "hi"})
        assert status == 404 and message == "model 'missing' not found"


async def test_workers_scale_up_to_concurrency_and_idle_ones_are_stopped(specs: dict[str, FunctionSpec]) -> None:
    host = Host()
    async with pool_of(specs["hold"], host, idle_s=0.2) as pool:
        calls = [asyncio.create_task(pool.call({}, {})) for _ in range(3)]
        await _until(lambda: host.holding == 3)
        assert pool.workers == 3
        host.release.set()
        assert [(await call).value["done"] for call in calls] == [True] * 3
        await _until(lambda: pool.workers == 0)
        assert (await pool.call({"model": "tiny"}, {})).value["done"]  # a cold start after the pool emptied


async def test_closing_lets_calls_in_flight_finish(specs: dict[str, FunctionSpec]) -> None:
    host = Host()
    pool = FunctionPool(filename="abuse.py", source=SOURCE, spec=specs["hold"], host=host)
    call = asyncio.create_task(pool.call({}, {}))
    async with asyncio.timeout(20):
        await host.held.wait()
    closing = asyncio.create_task(pool.aclose())
    await asyncio.sleep(0)
    status, _ = await call_status(pool, {"model": "tiny"})
    assert status == 503 and not closing.done()
    host.release.set()
    assert (await call).value["done"]
    await closing
    assert pool.workers == 0


async def test_a_stream_past_its_timeout_fails_mid_stream(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["drip"]) as pool:
        result = await pool.call({}, {})
        assert result.stream is not None
        assert await anext(result.stream) == "first"
        with pytest.raises(FunctionError) as info:
            await anext(result.stream)
        assert info.value.status == 504


async def _until(condition: Any) -> None:
    """Poll ``condition`` until it holds (20 s deadline): the pool has no event for it."""
    async with asyncio.timeout(20):
        for _ in iter(lambda: bool(condition()), True):
            await asyncio.sleep(0.02)


# ------------------------------------------------------------------ abuse


async def test_an_infinite_loop_times_out_and_the_next_call_works(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["spin"]) as pool:
        status, message = await call_status(pool, {"loop": True})
        assert status == 504 and "timed out after 1 s" in message
        assert (await pool.call({}, {})).value == "done"


async def test_a_memory_bomb_is_stopped_at_the_limit(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["hog"]) as pool:
        status, message = await call_status(pool, {})
        assert status == 502 and "limit 128 MB" in message


async def test_exit_and_segfault_are_502_and_the_worker_is_replaced(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["leave"]) as pool:
        status, message = await call_status(pool, {"exit": True})
        assert status == 502 and "exit status 7" in message
        assert (await pool.call({}, {})).value == "stayed"
    async with pool_of(specs["crash"]) as pool:
        status, message = await call_status(pool, {"crash": True})
        assert status == 502 and "SIGSEGV" in message
        assert (await pool.call({}, {})).value == "fine"


async def test_the_node_home_is_out_of_sight(specs: dict[str, FunctionSpec], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "home" / "cluster" / "secret"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"s" * 32)
    monkeypatch.setenv("OMX_HOME", str(tmp_path / "home"))
    async with pool_of(specs["peek"]) as pool:
        seen = (await pool.call({"path": str(secret)}, {})).value
        assert "read" not in seen and "FileNotFoundError" in seen["error"]
        assert "read" in (await pool.call({"path": "/usr/bin/env"}, {})).value  # the bound trees do show
        assert "FileNotFoundError" in (await pool.call({"path": __file__}, {})).value["error"]  # the rest does not


def test_a_home_inside_a_bound_tree_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    home = os.path.join(sys.prefix, "omx-home")
    monkeypatch.setenv("OMX_HOME", home)
    argv = sandbox_command(Limits(memory_mb=64, cpu_s=10))
    assert ["--tmpfs", home] == argv[argv.index(home) - 1:argv.index(home) + 1]
    assert argv.index("--tmpfs", argv.index(home) - 1) > argv.index(sys.prefix)  # mounted over the bound tree


async def test_the_environment_holds_nothing_of_omx(specs: dict[str, FunctionSpec],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMX_FOO", "bar")
    monkeypatch.setenv("OMX_CLUSTER_SECRET", "c2VjcmV0")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    async with pool_of(specs["environment"]) as pool:
        env = (await pool.call({}, {})).value
    assert env and not [name for name in env if name.startswith("OMX_") or "API_KEY" in name]


async def test_forks_stop_at_the_process_limit(specs: dict[str, FunctionSpec]) -> None:
    async with pool_of(specs["forks"]) as pool:
        made = (await pool.call({}, {})).value["forks"]
        assert 0 < made < 64  # RLIMIT_NPROC (32 per worker), far below the 2000 it tries


async def test_a_fork_bomb_is_contained(specs: dict[str, FunctionSpec]) -> None:
    host = Host()
    async with pool_of(specs["bomb"], host) as pool:
        call = asyncio.create_task(call_status(pool, {"bomb": True}))
        most = 0
        while not call.done():
            most = max(most, _sandboxed_processes())
            await asyncio.sleep(0.01)
        status, _ = await call
        assert status in (500, 502, 504)
        assert 0 < most < 64
        assert (await pool.call({}, {})).value == "calm"


def _sandboxed_processes() -> int:
    """How many processes run inside this test's sandboxes (the workers and what they forked)."""
    count = 0
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.name() != "bwrap":
                count += 1
        except psutil.Error:
            continue
    return count
