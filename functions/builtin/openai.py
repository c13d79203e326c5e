"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models`` and ``/v1/models/{model}``.

Requests are translated to the same internal steps the Ollama handlers use;
streams are SSE chunks ending with ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omx.errors import InvalidRequest, ModelNotFound
from omx.functions.builtin.embed import embed_texts, truncate_dimensions
from omx.functions.builtin.prompts import chat_prompt, fit_chat_prompt, generate_prompt
from omx.functions.builtin.toolcalls import parse_tool_calls
from omx.functions.call import Call
from omx.functions.cluster_models import remote_tags
from omx.functions.inference import Target, Timings, resolve_target, run_completion
from omx.functions.registry import Accepted, FunctionRegistry
from omx.functions.schemas import ChatMessage, null_is_unset
from omx.protocols import Completion, Runner
from omx.storage.holdings import model_key

__all__ = ["register"]

_FINGERPRINT = "fp_omx"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return null_is_unset(data)  # as Ollama's OpenAI layer: a null field is an unset one


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str = ""


class ImageURL(_Body):
    url: str


class ImagePart(_Body):
    """Parsed as OpenAI sends it, then refused: this node reads no images (see ``resolve_target``)."""

    # Documented as never valid, since the request is answered with 400.
    model_config = ConfigDict(json_schema_extra={
        "not": {}, "description": "Refused with 400: this node loads no vision projector, so it reads no images."})
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class OAIMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class _Sampling(_Body):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[OAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]})
    """One prompt: a string, or a list holding exactly one (several are refused)."""
    suffix: str | None = None


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]})
    """Non-empty text, or a non-empty list of non-empty texts."""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


def _options(req: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
    }
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    if req.seed is not None:
        options["seed"] = req.seed
    if req.stop is not None:
        options["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.frequency_penalty is not None:
        options["frequency_penalty"] = req.frequency_penalty
    if req.presence_penalty is not None:
        options["presence_penalty"] = req.presence_penalty
    return options


def _content_and_images(content: str | list[TextPart | ImagePart] | None) -> tuple[str, list[str]]:
    if content is None or isinstance(content, str):
        return content or "", []
    texts, images = [], []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(url.split(",", 1)[-1])
    return "\n".join(texts), images


def _to_chat_message(m: OAIMessage) -> ChatMessage:
    text, images = _content_and_images(m.content)
    calls = []
    for c in m.tool_calls or ():
        fn = c.get("function", {})
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args else {}
            except json.JSONDecodeError as exc:
                raise InvalidRequest("tool call arguments must be JSON") from exc
        calls.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for system messages
    return ChatMessage.model_validate({"role": role, "content": text, "images": images or None,
                                      "tool_calls": calls or None, "tool_name": m.name})


def _format(rf: ResponseFormat | None) -> object:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return "json"
    schema = (rf.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be an object")
    return schema


def _usage(t: Timings) -> dict[str, int]:
    prompt = t.done.prompt_eval_count if t.done else 0
    completion = t.done.eval_count if t.done else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(t: Timings) -> str:
    return "length" if t.done is not None and t.done.done_reason == "length" else "stop"


def _openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": "call_" + secrets.token_hex(6), "index": i, "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
            for i, c in enumerate(calls)]


async def chat_completions(body: ChatCompletionRequest, call: Call) -> Any:
    """OpenAI chat completions."""
    messages = [_to_chat_message(m) for m in body.messages]
    options = _options(body, body.max_completion_tokens or body.max_tokens)
    target = await resolve_target(call.services, body.model, options, None,
                                  images=any(m.images for m in messages))
    chat_prompt(target.model, messages, tools=body.tools)  # template errors answer 400 before streaming
    sampling = target.sampling(_format(body.response_format))

    async def completion(runner: Runner) -> Completion:
        prompt = await fit_chat_prompt(target.model, messages, tools=body.tools, num_ctx=target.spec.num_ctx,
                                       runner=runner)
        return Completion(prompt=prompt, options=sampling)

    timings = Timings(started=call.started)
    cid, created = "chatcmpl-" + secrets.token_hex(8), int(time.time())
    base = {"id": cid, "created": created, "model": body.model, "system_fingerprint": _FINGERPRINT}
    texts = run_completion(call.services, target, completion, timings, announce=body.stream)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _chat_stream(base, texts, timings, include_usage, tools=bool(body.tools))
    content = "".join([t async for t in texts if isinstance(t, str)])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    finish = _finish(timings)
    calls = parse_tool_calls(content) if body.tools else []
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": _openai_tool_calls(calls)}
        finish = "tool_calls"
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(timings)}


async def _chat_stream(base: dict[str, Any], texts: AsyncIterator[str | Accepted], timings: Timings,
                       include_usage: bool, *, tools: bool) -> AsyncIterator[Any]:
    chunk = {**base, "object": "chat.completion.chunk"}
    held: list[str] = []
    first = True
    async for text in texts:
        if isinstance(text, Accepted):
            yield text
            continue
        if tools:
            held.append(text)
            continue
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        first = False
        yield {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    finish = _finish(timings)
    if tools:
        full = "".join(held)
        calls = parse_tool_calls(full)
        delta = ({"role": "assistant", "tool_calls": _openai_tool_calls(calls)} if calls
                 else {"role": "assistant", "content": full})
        finish = "tool_calls" if calls else finish
        yield {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    if include_usage:
        yield {**chunk, "choices": [], "usage": _usage(timings)}
    yield "[DONE]"


async def completions(body: CompletionRequest, call: Call) -> Any:
    """OpenAI legacy text completions."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidRequest("exactly one prompt is supported per request")
    target = await resolve_target(call.services, body.model, _options(body, body.max_tokens), None)
    prompt = generate_prompt(target.model, prompt=prompts[0], system=None, suffix=body.suffix, template=None)
    completion = Completion(prompt=prompt, options=target.sampling())
    timings = Timings(started=call.started)
    base = {"id": "cmpl-" + secrets.token_hex(8), "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": _FINGERPRINT}
    texts = run_completion(call.services, target, completion, timings, announce=body.stream)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _completion_stream(base, texts, timings, include_usage)
    text = "".join([t async for t in texts if isinstance(t, str)])
    return {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": _finish(timings)}],
            "usage": _usage(timings)}


async def _completion_stream(base: dict[str, Any], texts: AsyncIterator[str | Accepted], timings: Timings,
                             include_usage: bool) -> AsyncIterator[Any]:
    async for text in texts:
        if isinstance(text, Accepted):
            yield text
            continue
        yield {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}
    yield {**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": _finish(timings)}]}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(timings)}
    yield "[DONE]"


async def embeddings(body: EmbeddingRequest, call: Call) -> dict[str, Any]:
    """OpenAI embeddings (normalized vectors)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(t == "" for t in texts):
        raise InvalidRequest("input must be a non-empty string or a list of non-empty strings")
    target: Target = await resolve_target(call.services, body.model, None, None, need=None)
    result, _ = await embed_texts(call, target, texts, normalize=True)
    data = []
    for i, vec in enumerate(result.embeddings):
        values = list(vec)
        if body.dimensions is not None:
            values = truncate_dimensions(values, body.dimensions)
        emb: Any = values
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": result.prompt_eval_count, "total_tokens": result.prompt_eval_count}}


def _model_object(entry: Any) -> dict[str, Any]:
    modified = entry.modified_at
    created = int(modified.timestamp()) if hasattr(modified, "timestamp") else int(time.time())
    owner = entry.name.split("/")[0] if "/" in entry.name else "library"
    return {"id": entry.name, "object": "model", "created": created, "owned_by": owner}


def _row_object(row: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI model object from a peer's ``/api/tags`` row."""
    try:
        created = int(datetime.fromisoformat(str(row.get("modified_at"))).timestamp())
    except ValueError:
        created = int(time.time())
    name = str(row["name"])
    return {"id": name, "object": "model", "created": created,
            "owned_by": name.split("/")[0] if "/" in name else "library"}


async def _elsewhere(call: Call, local: list[str]) -> list[dict[str, Any]]:
    router = call.services.router
    return [] if router is None else [_row_object(r) for r in await remote_tags(router, local)]


async def list_models(_body: None, call: Call) -> dict[str, Any]:
    """OpenAI model list: the models held in the cluster, this node's first."""
    entries = await call.services.store.list_models()
    data = [_model_object(e) for e in entries] + await _elsewhere(call, [e.name for e in entries])
    return {"object": "list", "data": data}


async def retrieve_model(_body: None, call: Call) -> dict[str, Any]:
    """One OpenAI model object (of a model held here or by a peer)."""
    name = call.path_params["model"]
    try:
        resolved = await call.services.store.resolve(name)
    except ModelNotFound:
        key = model_key(name)
        found = [o for o in await _elsewhere(call, []) if model_key(o["id"]) == key]
        if not found:
            raise
        return found[0]
    wanted = resolved.name.display
    for entry in await call.services.store.list_models():
        if entry.name == wanted:
            return _model_object(entry)
    raise ModelNotFound(name)


def register(registry: FunctionRegistry) -> None:
    h = registry.handler
    h("/v1/chat/completions", request=ChatCompletionRequest, response="sse", model_field="model",
      model_routed=True, name="openai_chat", tags=("openai",))(chat_completions)
    h("/v1/completions", request=CompletionRequest, response="sse", model_field="model",
      model_routed=True, name="openai_completions", tags=("openai",))(completions)
    h("/v1/embeddings", request=EmbeddingRequest, model_field="model", model_routed=True,
      name="openai_embeddings", tags=("openai",))(embeddings)
    h("/v1/models", methods=("GET",), name="openai_models", tags=("openai",))(list_models)
    h("/v1/models/{model:path}", methods=("GET",), name="openai_model", tags=("openai",))(retrieve_model)
