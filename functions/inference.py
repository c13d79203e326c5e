"""Shared steps of every inference handler: resolve the model, build its load
spec and sampling options, render the prompt, and run a completion under a
scheduler lease."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omx.errors import InvalidRequest, UnsupportedCapability
from omx.functions.call import Services
from omx.functions.options import (
    LOAD_OPTIONS,
    json_grammar,
    merge_options,
    parse_keep_alive,
    sampling_options,
)
from omx.functions.registry import ACCEPTED, Accepted
from omx.protocols import Completion, CompletionChunk, CompletionDone, ModelSpec, Runner, SamplingOptions
from omx.storage import ResolvedModel
from omx.timefmt import iso_time

__all__ = ["Prepare", "Target", "Timings", "created_at", "resolve_target", "run_completion"]


def created_at() -> str:
    """Ollama's ``created_at`` of a reply or streamed chunk: now, RFC 3339 UTC with microseconds."""
    return iso_time()


@dataclass(frozen=True)
class Target:
    """A model resolved for one request."""

    name: str
    model: ResolvedModel
    """The store's resolved model (manifest, paths, template, params…)."""
    spec: ModelSpec
    options: Mapping[str, Any]
    keep_alive: float | None

    def sampling(self, fmt: object = None) -> SamplingOptions:
        return sampling_options(self.options, grammar=json_grammar(fmt))

    @property
    def capabilities(self) -> Sequence[str]:
        return tuple(self.model.capabilities)


def _image_refusal(name: str, caps: Sequence[str]) -> str:
    """Why a request with images is refused: omx never answers as if it had seen them."""
    if "vision" not in caps:
        return f"model '{name}' does not support image input: it has no vision projector"
    return (f"model '{name}' has a vision projector, but this node cannot read images: omx's runner "
            "does not load vision projectors (mmproj); send the request without images")


MAX_THREADS = 1024
"""The most ``num_thread`` a request may ask for (as ``engine.num_thread`` in the config)."""


def _load_bounds(model: ResolvedModel, merged: Mapping[str, Any], default_ctx: int,
                 default_batch: int) -> tuple[int, int]:
    """Check the load options a request may set; returns (num_ctx, num_batch).

    As Ollama does, a context longer than the model was trained for is cut to
    that length (it could never be used, and allocating it can fail outright).
    """
    num_ctx, num_batch = int(merged.get("num_ctx", default_ctx)), int(merged.get("num_batch", default_batch))
    if num_ctx < 1:
        raise InvalidRequest("num_ctx must be positive")
    if num_batch < 1:
        raise InvalidRequest("num_batch must be positive")
    threads = merged.get("num_thread")
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        raise InvalidRequest(f"num_thread must be between 0 (the default) and {MAX_THREADS}")
    trained = model.gguf.context_length if model.gguf is not None else None
    if trained:
        num_ctx = min(num_ctx, int(trained))
    return num_ctx, num_batch


async def resolve_target(
    services: Services,
    name: str,
    options: Mapping[str, Any] | None,
    keep_alive: float | int | str | None,
    *,
    images: bool = False,
    need: str | None = "completion",
) -> Target:
    """Resolve ``name`` in the store and merge options (model < request)."""
    if not name:
        raise InvalidRequest("model is required")
    model = await services.store.resolve(name)
    merged = merge_options(model.params, options)
    caps = tuple(model.capabilities)
    if need is not None and caps and need not in caps:
        raise UnsupportedCapability(f'"{name}" does not support {need if need != "completion" else "generate"}')
    if images:
        raise UnsupportedCapability(_image_refusal(name, caps))
    defaults = services.defaults
    num_ctx, num_batch = _load_bounds(model, merged, defaults.num_ctx, defaults.num_batch)
    spec = ModelSpec(
        name=model.name.display,
        model_path=model.model_path,
        digest=model.model_digest,
        adapter_paths=model.adapter_paths,
        projector_paths=model.projector_paths,
        num_ctx=num_ctx,
        num_batch=min(num_batch, num_ctx),
        num_thread=merged.get("num_thread", defaults.num_thread) or None,
        num_gpu=int(merged.get("num_gpu", -1)),  # -1: the engine's default (as many layers as fit)
        num_parallel=defaults.num_parallel,
        use_mmap=bool(merged.get("use_mmap", True)),
        size=model.size,
    )
    sampling = {k: v for k, v in merged.items() if k not in LOAD_OPTIONS}
    return Target(name=name, model=model, spec=spec, options=sampling, keep_alive=parse_keep_alive(keep_alive))


@dataclass
class Timings:
    """Measurements for the final ``done`` object, in nanoseconds."""

    started: int
    load_duration: int = 0
    done: CompletionDone | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total_duration": time.perf_counter_ns() - self.started,
                               "load_duration": self.load_duration}
        if self.done is not None:
            out.update(
                prompt_eval_count=self.done.prompt_eval_count,
                prompt_eval_duration=self.done.prompt_eval_duration,
                eval_count=self.done.eval_count,
                eval_duration=self.done.eval_duration,
            )
        return out


Prepare = Callable[[Runner], Awaitable[Completion]]
"""Builds the completion once a runner is leased (e.g. to fit a chat into the context)."""


def _surely_fits(completion: Completion, num_ctx: int) -> bool:
    """True when the prompt cannot exceed the context: a token is never shorter than a byte."""
    return len(completion.prompt.encode()) + len(completion.context) + 2 <= num_ctx


async def run_completion(
    services: Services, target: Target, completion: Completion | Prepare, timings: Timings,
    *, announce: bool = False,
) -> AsyncIterator[str | Accepted]:
    """Lease a runner, stream generated text, and fill ``timings`` at the end.

    With ``announce``, :data:`ACCEPTED` comes first once the runner has the
    request and it cannot fail on its prompt, so the reply's headers travel while
    the first token is computed.
    """
    before = time.perf_counter_ns()
    async with services.scheduler.lease(target.spec, keep_alive=target.keep_alive) as runner:
        timings.load_duration = time.perf_counter_ns() - before
        if not isinstance(completion, Completion):
            completion = await completion(runner)
        stream = runner.complete(completion)
        try:
            if announce and _surely_fits(completion, target.spec.num_ctx):
                # The runner has the request: let the headers travel while it computes.
                yield ACCEPTED
            async for item in stream:
                if isinstance(item, CompletionChunk):
                    if item.text:
                        yield item.text
                else:
                    timings.done = item
        finally:
            await stream.aclose()
    sink = services.usage
    if sink is not None and timings.done is not None:
        sink.model_request(target.spec.name, prompt_tokens=timings.done.prompt_eval_count,
                           generated_tokens=timings.done.eval_count)
