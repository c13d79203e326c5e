"""``/api/embed`` (normalized, batched) and the legacy ``/api/embeddings`` (raw)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from omx.errors import InvalidRequest
from omx.functions.call import Call
from omx.functions.inference import Target, resolve_target
from omx.functions.registry import FunctionRegistry
from omx.functions.schemas import EmbeddingsRequest, EmbedRequest
from omx.protocols import EmbedResult

__all__ = ["embed_texts", "register", "truncate_dimensions"]


async def embed_texts(call: Call, target: Target, texts: Sequence[str], *, normalize: bool,
                      truncate: bool = True) -> tuple[EmbedResult, int]:
    """Embed ``texts`` under a runner lease; returns the result and the load time in ns."""
    before = time.perf_counter_ns()
    async with call.services.scheduler.lease(target.spec, keep_alive=target.keep_alive) as runner:
        load = time.perf_counter_ns() - before
        result = await runner.embed(texts, normalize=normalize, truncate=truncate)
    sink = call.services.usage
    if sink is not None:
        sink.model_request(target.spec.name, prompt_tokens=result.prompt_eval_count, generated_tokens=0)
    return result, load


async def embed(body: EmbedRequest, call: Call) -> dict[str, Any]:
    """Embed one or more inputs; vectors are L2-normalized."""
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    target = await resolve_target(call.services, body.model, body.options, body.keep_alive, need=None)
    if not texts or (len(texts) == 1 and texts[0] == ""):
        await call.services.scheduler.load(target.spec, keep_alive=target.keep_alive)
        return {"model": body.model, "embeddings": [], "total_duration": time.perf_counter_ns() - call.started,
                "load_duration": 0, "prompt_eval_count": 0}
    if any(not isinstance(t, str) for t in texts):
        raise InvalidRequest("input must be a string or a list of strings")
    result, load = await embed_texts(call, target, texts, normalize=True, truncate=body.truncate)
    vectors = [list(v) for v in result.embeddings]
    if body.dimensions is not None:
        vectors = [truncate_dimensions(v, body.dimensions) for v in vectors]
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": time.perf_counter_ns() - call.started,
        "load_duration": load,
        "prompt_eval_count": result.prompt_eval_count,
    }


def truncate_dimensions(vector: list[float], dims: int) -> list[float]:
    """Matryoshka-style truncation, renormalized as Ollama does."""
    if dims >= len(vector):
        return vector
    head = vector[:dims]
    norm = sum(x * x for x in head) ** 0.5
    return [x / norm for x in head] if norm else head


async def embeddings(body: EmbeddingsRequest, call: Call) -> dict[str, Any]:
    """Embed one prompt; the vector is returned raw (not normalized)."""
    target = await resolve_target(call.services, body.model, body.options, body.keep_alive, need=None)
    if not body.prompt:
        await call.services.scheduler.load(target.spec, keep_alive=target.keep_alive)
        return {"embedding": []}
    result, _load = await embed_texts(call, target, [body.prompt], normalize=False)
    return {"embedding": list(result.embeddings[0])}


def register(registry: FunctionRegistry) -> None:
    registry.handler("/api/embed", request=EmbedRequest, model_field="model", model_routed=True,
                     tags=("ollama",))(embed)
    registry.handler("/api/embeddings", request=EmbeddingsRequest, model_field="model", model_routed=True,
                     tags=("ollama",))(embeddings)
