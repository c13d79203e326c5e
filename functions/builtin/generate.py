"""``/api/generate`` and ``/api/chat``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from omx.errors import UnsupportedCapability
from omx.functions.builtin.prompts import chat_prompt, fit_chat_prompt, generate_prompt
from omx.functions.builtin.toolcalls import parse_tool_calls
from omx.functions.call import Call
from omx.functions.inference import Prepare, Target, Timings, created_at, resolve_target, run_completion
from omx.functions.registry import Accepted, FunctionRegistry
from omx.functions.schemas import ChatRequest, GenerateRequest
from omx.protocols import Completion, Runner

__all__ = ["register"]


async def _load_only(call: Call, target: Target, started: int, *, key: str, message: bool) -> dict[str, Any]:
    """An empty prompt loads the model; ``keep_alive: 0`` with it unloads."""
    services = call.services
    if target.keep_alive == 0:
        await services.scheduler.unload(target.spec.name)
        reason = "unload"
    else:
        await services.scheduler.load(target.spec, keep_alive=target.keep_alive)
        reason = "load"
    out: dict[str, Any] = {"model": target.name, "created_at": created_at()}
    out[key] = {"role": "assistant", "content": ""} if message else ""
    out.update(done=True, done_reason=reason)
    if not message:
        out["total_duration"] = time.perf_counter_ns() - started
    return out


def _final(target: Target, timings: Timings) -> dict[str, Any]:
    done = timings.done
    return {"model": target.name, "created_at": created_at(), "done": True,
            "done_reason": done.done_reason if done else "stop", **timings.fields()}


async def _generate_stream(call: Call, target: Target, completion: Completion,
                           timings: Timings, *, streamed: bool) -> AsyncIterator[Any]:
    async for text in run_completion(call.services, target, completion, timings, announce=streamed):
        if isinstance(text, Accepted):
            yield text
            continue
        yield {"model": target.name, "created_at": created_at(), "response": text, "done": False}
    final = _final(target, timings)
    final["response"] = ""
    if timings.done is not None and completion.return_context:
        final["context"] = list(timings.done.context)
    yield final


async def generate(body: GenerateRequest, call: Call) -> Any:
    """Generate a completion for a prompt."""
    started = call.started
    target = await resolve_target(call.services, body.model, body.options, body.keep_alive,
                                  images=bool(body.images))
    if not body.prompt and not body.suffix and not body.context:
        return await _load_only(call, target, started, key="response", message=False)
    if body.suffix and not body.raw and "insert" not in target.capabilities:
        raise UnsupportedCapability(f"model '{body.model}' does not support insert (its template has no .Suffix)")
    prompt = body.prompt if body.raw else generate_prompt(
        target.model, prompt=body.prompt, system=body.system, suffix=body.suffix or None,
        template=body.template,
    )
    completion = Completion(
        prompt=prompt,
        options=target.sampling(body.format),
        context=tuple(body.context or ()),
        add_bos=not body.context,
        return_context=not body.raw,
    )
    timings = Timings(started=started)
    stream = _generate_stream(call, target, completion, timings, streamed=body.stream)
    if body.stream:
        return stream
    parts: list[str] = []
    final: dict[str, Any] = {}
    async for item in stream:
        if item["done"]:
            final = item
        else:
            parts.append(item["response"])
    final["response"] = "".join(parts)
    return final


async def _chat_stream(call: Call, target: Target, completion: Completion | Prepare, timings: Timings,
                       tools: bool, *, streamed: bool) -> AsyncIterator[Any]:
    parts: list[str] = []
    async for text in run_completion(call.services, target, completion, timings, announce=streamed):
        if isinstance(text, Accepted):
            yield text
            continue
        if tools:
            # Tool calls are only known once the whole reply is in: hold text back.
            parts.append(text)
            continue
        yield {"model": target.name, "created_at": created_at(),
               "message": {"role": "assistant", "content": text}, "done": False}
    if tools:
        full = "".join(parts)
        calls = parse_tool_calls(full)
        message: dict[str, Any] = {"role": "assistant", "content": "" if calls else full}
        if calls:
            message["tool_calls"] = calls
        yield {"model": target.name, "created_at": created_at(), "message": message, "done": False}
    final = _final(target, timings)
    final["message"] = {"role": "assistant", "content": ""}
    yield final


async def chat(body: ChatRequest, call: Call) -> Any:
    """Generate the next message of a chat."""
    started = call.started
    images = any(m.images for m in body.messages)
    target = await resolve_target(call.services, body.model, body.options, body.keep_alive, images=images)
    if not body.messages:
        return await _load_only(call, target, started, key="message", message=True)
    chat_prompt(target.model, body.messages, tools=body.tools)  # template errors answer 400 before streaming
    options = target.sampling(body.format)

    async def prepare(runner: Runner) -> Completion:
        prompt = await fit_chat_prompt(target.model, body.messages, tools=body.tools, num_ctx=target.spec.num_ctx,
                                       runner=runner)
        return Completion(prompt=prompt, options=options)

    timings = Timings(started=started)
    stream = _chat_stream(call, target, prepare, timings, tools=bool(body.tools), streamed=body.stream)
    if body.stream:
        return stream
    content: list[str] = []
    tool_calls: list[Any] = []
    final: dict[str, Any] = {}
    async for item in stream:
        if item["done"]:
            final = item
        else:
            content.append(item["message"]["content"])
            tool_calls.extend(item["message"].get("tool_calls", ()))
    final["message"] = {"role": "assistant", "content": "".join(content)}
    if tool_calls:
        final["message"]["tool_calls"] = tool_calls
    return final


def register(registry: FunctionRegistry) -> None:
    registry.handler("/api/generate", request=GenerateRequest, response="ndjson",
                     model_field="model", model_routed=True, tags=("ollama",))(generate)
    registry.handler("/api/chat", request=ChatRequest, response="ndjson",
                     model_field="model", model_routed=True, tags=("ollama",))(chat)
