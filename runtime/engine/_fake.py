"""An in-process engine for tests of the layers above the engine.

:class:`FakeEngine` starts :class:`FakeRunner` objects that "generate" by
echoing the prompt's words, one chunk per word, without any model. Loads can
be slowed or made to fail, and runners can be crashed, so the scheduler and
handlers are testable without llama.cpp.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from omx.errors import EngineError, RunnerCrashed
from omx.protocols import Completion, CompletionChunk, CompletionDone, EmbedResult, ModelSpec

__all__ = ["FakeEngine", "FakeRunner"]


class FakeRunner:
    """A runner whose output is the prompt's words, echoed back."""

    def __init__(self, spec: ModelSpec, engine: FakeEngine) -> None:
        self.spec = spec
        self._engine = engine
        self._alive = True
        self.closed = False
        self.active = 0
        self.gate: asyncio.Event | None = None
        """When set, each generation waits on it before finishing (to hold a slot open)."""

    @property
    def alive(self) -> bool:
        return self._alive and not self.closed

    def crash(self) -> None:
        """Pretend the process died."""
        self._alive = False

    async def complete(self, request: Completion) -> AsyncGenerator[CompletionChunk | CompletionDone, None]:
        if not self.alive:
            raise RunnerCrashed(f"runner for model '{self.spec.name}' exited unexpectedly")
        self.active += 1
        self._engine.max_active = max(self._engine.max_active, self.active)
        try:
            words = request.prompt.split()
            limit = request.options.num_predict if request.options.num_predict > 0 else len(words)
            for word in words[:limit]:
                await asyncio.sleep(0)
                if not self.alive:
                    raise RunnerCrashed(f"runner for model '{self.spec.name}' exited unexpectedly")
                yield CompletionChunk(word + " ")
            if self.gate is not None:
                await asyncio.wait_for(self.gate.wait(), 30)
            yield CompletionDone("stop" if limit >= len(words) else "length", len(words), 1, min(limit, len(words)), 1)
        finally:
            self.active -= 1

    async def embed(self, inputs: Sequence[str], *, normalize: bool, truncate: bool = True) -> EmbedResult:
        vectors = tuple((float(len(text)), 1.0) for text in inputs)
        return EmbedResult(vectors, sum(len(t.split()) for t in inputs))

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return [len(word) for word in text.split()]

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return " ".join("x" * t for t in tokens)

    async def close(self) -> None:
        self.closed = True
        self._engine.closed.append(self.spec.name)


class FakeEngine:
    """Starts :class:`FakeRunner` objects and records what happened."""

    name = "fake"

    def __init__(self, *, load_delay: float = 0.0, fail: set[str] | None = None) -> None:
        self.load_delay = load_delay
        self.fail = set(fail or ())
        self.started: list[str] = []
        self.closed: list[str] = []
        self.runners: list[FakeRunner] = []
        self.max_active = 0

    async def start(self, spec: ModelSpec) -> FakeRunner:
        self.started.append(spec.name)
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        if spec.name in self.fail:
            raise EngineError(f"failed to load model '{spec.name}': broken file")
        runner = FakeRunner(spec, self)
        self.runners.append(runner)
        return runner
