"""The llama-cpp-python engine against bare llama-cpp-python, on tiny real GGUF models."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import llama_cpp
import pytest

from omx.errors import EngineError, InvalidRequest, RunnerCrashed
from omx.protocols import Completion, CompletionChunk, CompletionDone, ModelSpec, SamplingOptions
from omx.runtime.engine import LlamaCppEngine, ProcessRunner, make_engine
from omx.types import BlobDigest
from tests.support.tiny_gguf import write_tiny_llama

N_CTX = 256
N_BATCH = 512
GREEDY = SamplingOptions(temperature=0.0, num_predict=24)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "plain": write_tiny_llama(root / "plain.gguf", seed=1),
        "f16": write_tiny_llama(root / "f16.gguf", seed=2, dtype="f16"),
        "bytes": write_tiny_llama(root / "bytes.gguf", seed=3, emit_bytes=True),
        "pooled": write_tiny_llama(root / "pooled.gguf", seed=4, pooling="mean"),
        "long": write_tiny_llama(root / "long.gguf", seed=5, n_ctx=8192),
    }


def spec_for(path: Path, *, num_ctx: int = N_CTX, num_parallel: int = 1) -> ModelSpec:
    return ModelSpec(name=path.stem, model_path=path, digest=BlobDigest("sha256:" + "0" * 64),
                     num_ctx=num_ctx, num_batch=N_BATCH, num_thread=1, num_parallel=num_parallel)


def bare(path: Path, **kwargs: object) -> llama_cpp.Llama:
    params = {"n_ctx": N_CTX, "n_batch": N_BATCH, "n_threads": 1, "verbose": False, **kwargs}
    return llama_cpp.Llama(str(path), **params)


def bare_kwargs(opts: SamplingOptions) -> dict[str, object]:
    return {
        "max_tokens": opts.num_predict if opts.num_predict > 0 else None,
        "temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p, "min_p": opts.min_p,
        "typical_p": opts.typical_p, "repeat_penalty": opts.repeat_penalty,
        "presence_penalty": opts.presence_penalty, "frequency_penalty": opts.frequency_penalty,
        "stop": list(opts.stop), "seed": opts.seed,
    }


async def collect(runner: ProcessRunner, request: Completion) -> tuple[list[str], CompletionDone]:
    chunks: list[str] = []
    done = None
    async for item in runner.complete(request):
        if isinstance(item, CompletionChunk):
            chunks.append(item.text)
        else:
            done = item
    assert done is not None
    return chunks, done


@pytest.fixture
async def runner(models: dict[str, Path]):
    r = await LlamaCppEngine().start(spec_for(models["plain"]))
    yield r
    await r.close()


@pytest.mark.parametrize("prompt", ["hello world", "the sky is blue because", "", "why"])
@pytest.mark.parametrize("model", ["plain", "f16", "bytes"])
async def test_greedy_text_and_counts_equal_bare(models: dict[str, Path], model: str, prompt: str) -> None:
    opts = SamplingOptions(temperature=0.0, num_predict=24, repeat_penalty=1.3, repeat_last_n=16)
    runner = await LlamaCppEngine().start(spec_for(models[model]))
    try:
        chunks, done = await collect(runner, Completion(prompt, opts))
    finally:
        await runner.close()
    reference = bare(models[model], last_n_tokens_size=16).create_completion(prompt, **bare_kwargs(opts))
    assert "".join(chunks) == reference["choices"][0]["text"]
    # llama-cpp-python counts the BOS it seeds an empty prompt's completion with as generated.
    assert done.eval_count == reference["usage"]["completion_tokens"] - (prompt == "") == 24 - (prompt == "")
    assert done.prompt_eval_count == reference["usage"]["prompt_tokens"]
    assert done.done_reason == "length"
    assert done.prompt_eval_duration > 0 and done.eval_duration > 0


async def test_sampling_with_seed_equals_bare(models: dict[str, Path], runner: ProcessRunner) -> None:
    opts = SamplingOptions(temperature=0.9, top_k=20, top_p=0.8, min_p=0.02, seed=1234, num_predict=30,
                           presence_penalty=0.3, frequency_penalty=0.2)
    chunks, _ = await collect(runner, Completion("the model", opts))
    reference = bare(models["plain"]).create_completion("the model", **bare_kwargs(opts))
    assert "".join(chunks) == reference["choices"][0]["text"]


async def test_stop_string_ends_generation_and_is_never_streamed(models: dict[str, Path],
                                                                 runner: ProcessRunner) -> None:
    free = bare(models["plain"]).create_completion("hello world", **bare_kwargs(GREEDY))["choices"][0]["text"]
    words = free.split()
    stop = words[len(words) // 2]
    opts = SamplingOptions(temperature=0.0, num_predict=24, stop=(stop,))
    chunks, done = await collect(runner, Completion("hello world", opts))
    reference = bare(models["plain"]).create_completion("hello world", **bare_kwargs(opts))
    text = "".join(chunks)
    assert text == reference["choices"][0]["text"]
    assert stop not in text
    assert done.done_reason == "stop"
    assert done.eval_count == reference["usage"]["completion_tokens"] < 24


async def test_num_predict_until_context_is_full(models: dict[str, Path]) -> None:
    runner = await LlamaCppEngine().start(spec_for(models["plain"], num_ctx=64))
    try:
        for num_predict in (-1, -2):
            opts = SamplingOptions(temperature=0.0, num_predict=num_predict)
            _, done = await collect(runner, Completion("hello world", opts))
            assert done.prompt_eval_count == 3
            # llama.cpp may round the context up; the runner reports the real size.
            assert done.eval_count == runner.info["n_ctx"] - 3
            assert done.done_reason == "length"
    finally:
        await runner.close()


async def test_grammar_constrains_output_to_json(runner: ProcessRunner) -> None:
    grammar = r'''
root   ::= "{" ws "\"name\"" ws ":" ws string ws "," ws "\"age\"" ws ":" ws number ws "}"
string ::= "\"" [a-z]{1,8} "\""
number ::= [1-9] [0-9]{0,2}
ws     ::= " "?
'''
    opts = SamplingOptions(temperature=0.0, num_predict=64, grammar=grammar)
    chunks, done = await collect(runner, Completion("json", opts))
    value = json.loads("".join(chunks))
    assert set(value) == {"name", "age"}
    assert done.done_reason == "stop"


async def test_invalid_grammar_is_a_clean_error(runner: ProcessRunner) -> None:
    opts = SamplingOptions(temperature=0.0, num_predict=4, grammar="root ::= (")
    with pytest.raises(InvalidRequest, match="grammar"):
        await collect(runner, Completion("json", opts))
    _, done = await collect(runner, Completion("hello", GREEDY))
    assert done.eval_count == 24


async def test_prompt_longer_than_context_is_invalid(runner: ProcessRunner) -> None:
    with pytest.raises(InvalidRequest, match="context window"):
        await collect(runner, Completion("hello " * 300, GREEDY))


async def test_context_round_trip_equals_bare_on_tokens(models: dict[str, Path], runner: ProcessRunner) -> None:
    first_chunks, first = await collect(runner, Completion("hello world", GREEDY, return_context=True))
    prompt_tokens = await runner.tokenize("hello world")
    assert first.context[: len(prompt_tokens)] == tuple(prompt_tokens)
    assert len(first.context) == len(prompt_tokens) + first.eval_count
    assert await runner.detokenize(first.context[len(prompt_tokens):]) == "".join(first_chunks)

    chunks, second = await collect(runner, Completion(" the sky", GREEDY, context=first.context,
                                                      return_context=True))
    llm = bare(models["plain"])
    tokens = list(first.context) + llm.tokenize(b" the sky", add_bos=False, special=True)
    reference = llm.create_completion(tokens, **bare_kwargs(GREEDY))
    assert "".join(chunks) == reference["choices"][0]["text"]
    assert second.prompt_eval_count == len(tokens)
    assert second.context[: len(tokens)] == tuple(tokens)


async def test_tokenize_and_detokenize(runner: ProcessRunner) -> None:
    tokens = await runner.tokenize("hello world, the sky")
    assert tokens[0] == 1
    assert await runner.tokenize("hello", add_special=False) == tokens[1:2]
    assert (await runner.detokenize(tokens)).strip() == "hello world, the sky"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("model", ["pooled", "plain"])
async def test_embeddings_equal_bare(models: dict[str, Path], model: str, normalize: bool) -> None:
    texts = ["hello world", "the sky is blue", "why"]
    runner = await LlamaCppEngine().start(spec_for(models[model]))
    try:
        result = await runner.embed(texts, normalize=normalize)
    finally:
        await runner.close()
    # A model that declares no pooling is embedded with mean pooling.
    pooling = {} if model == "pooled" else {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
    llm = bare(models[model], embedding=True, n_batch=N_CTX, n_ubatch=N_CTX, **pooling)
    expected, count = llm.embed(texts, normalize=normalize, return_count=True)
    assert result.prompt_eval_count == count
    assert len(result.embeddings) == 3
    for got, want in zip(result.embeddings, expected, strict=True):
        assert list(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
    if normalize:
        assert sum(x * x for x in result.embeddings[0]) == pytest.approx(1.0, rel=1e-4)


async def test_cancel_stops_generation_in_the_runner(models: dict[str, Path]) -> None:
    runner = await LlamaCppEngine().start(spec_for(models["long"], num_ctx=8192))
    try:
        stream = runner.complete(Completion("hello", SamplingOptions(temperature=0.0, num_predict=-1)))
        received = 0
        async for item in stream:
            assert isinstance(item, CompletionChunk)
            received += 1
            if received == 3:
                break
        await stream.aclose()
        deadline = asyncio.get_running_loop().time() + 20
        while runner.cancelled_generations == 0:
            assert asyncio.get_running_loop().time() < deadline, "the runner never stopped the generation"
            await asyncio.sleep(0.05)
        # The only slot is free again: a new request runs to completion.
        _, done = await collect(runner, Completion("hello", GREEDY))
        assert done.eval_count == 24
    finally:
        await runner.close()


async def test_a_runner_that_goes_silent_fails_the_request_and_recovers(models: dict[str, Path]) -> None:
    runner = await LlamaCppEngine(token_timeout=1.0).start(spec_for(models["long"], num_ctx=8192))
    try:
        received = 0
        with pytest.raises(EngineError, match="produced nothing for 1 s"):
            async for item in runner.complete(Completion("hello", SamplingOptions(temperature=0.0,
                                                                                  num_predict=-1))):
                assert isinstance(item, CompletionChunk)
                received += 1
                if received == 2:
                    os.kill(runner.pid, signal.SIGSTOP)  # frozen: alive, but sends nothing
        assert received >= 2  # what was already on its way still arrives
        os.kill(runner.pid, signal.SIGCONT)
        deadline = asyncio.get_running_loop().time() + 20
        while runner.cancelled_generations == 0:  # the timed-out generation was cancelled in the runner
            assert asyncio.get_running_loop().time() < deadline, "the runner never stopped the generation"
            await asyncio.sleep(0.05)
        assert runner.alive
        _, done = await collect(runner, Completion("hello", GREEDY))
        assert done.eval_count == 24
    finally:
        os.kill(runner.pid, signal.SIGCONT)
        await runner.close()


async def test_kill_mid_generation_raises_runner_crashed(models: dict[str, Path]) -> None:
    engine = LlamaCppEngine()
    spec = spec_for(models["long"], num_ctx=8192)
    runner = await engine.start(spec)
    try:
        with pytest.raises(RunnerCrashed, match="SIGKILL"):
            async for _ in runner.complete(Completion("hello", SamplingOptions(temperature=0.0, num_predict=-1))):
                os.kill(runner.pid, signal.SIGKILL)
        assert not runner.alive
        with pytest.raises(RunnerCrashed):
            await runner.tokenize("hello")
    finally:
        await runner.close()
    again = await engine.start(spec)
    try:
        _, done = await collect(again, Completion("hello", GREEDY))
        assert done.eval_count == 24
    finally:
        await again.close()


async def test_parallel_slots_serve_concurrent_requests_faithfully(models: dict[str, Path]) -> None:
    runner = await LlamaCppEngine().start(spec_for(models["plain"], num_parallel=2))
    try:
        assert runner.info["n_parallel"] == 2
        prompts = ["hello world", "the sky is blue", "why", "one two"]
        results = await asyncio.gather(*(collect(runner, Completion(p, GREEDY)) for p in prompts))
    finally:
        await runner.close()
    llm = bare(models["plain"])
    for prompt, (chunks, done) in zip(prompts, results, strict=True):
        assert "".join(chunks) == llm.create_completion(prompt, **bare_kwargs(GREEDY))["choices"][0]["text"]
        assert done.eval_count == 24


async def test_missing_or_broken_model_fails_to_load_cleanly(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match="failed to load model 'broken'"):
        await LlamaCppEngine().start(spec_for(broken))


def test_make_engine_selects_backends() -> None:
    assert make_engine("llama-cpp").name == "llama-cpp"
    assert make_engine("llama.cpp", num_thread=2).num_thread == 2
    assert make_engine("ctransformers").name == "ctransformers"
    from omx.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown engine backend"):
        make_engine("vllm")


async def test_a_garbled_frame_from_the_runner_fails_its_request_cleanly(tmp_path: Path) -> None:
    # A stand-in for the interpreter: it answers the load, then writes a byte msgpack never uses.
    fake = tmp_path / "fake-python"
    fake.write_text(f"""#!{sys.executable}
import os, sys, time
from omx.runtime.engine import _wire
frames = _wire.decoder()
def next_frame():
    while True:
        for frame in frames:
            return frame
        frames.feed(os.read(0, 65536))
next_frame()
os.write(1, _wire.encode(["ready", 0, {{"backend": "fake"}}]))
next_frame()
os.write(1, b"\\xc1")
time.sleep(60)
""")
    fake.chmod(0o755)
    spec = ModelSpec(name="garbled", model_path=tmp_path / "none.gguf", digest=BlobDigest("sha256:" + "0" * 64))
    runner = await ProcessRunner.spawn(spec, {}, python=str(fake), token_timeout=30)
    try:
        with pytest.raises(RunnerCrashed, match="garbled frame"):
            async for _ in runner.complete(Completion("hello", GREEDY)):
                pass
        assert not runner.alive
    finally:
        await runner.close()
