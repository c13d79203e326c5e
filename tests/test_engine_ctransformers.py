"""The ctransformers backend behind the same Runner interface, on the tiny llama GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
from ctransformers import AutoModelForCausalLM

from omx.errors import UnsupportedCapability
from omx.protocols import Completion, CompletionChunk, CompletionDone, ModelSpec, SamplingOptions
from omx.runtime.engine import CTransformersEngine, make_engine
from omx.types import BlobDigest
from tests.support.tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("ct") / "tiny.gguf", seed=21)


async def test_generates_like_ctransformers_itself(model: Path) -> None:
    spec = ModelSpec(name="tiny", model_path=model, digest=BlobDigest("sha256:" + "3" * 64), num_ctx=256,
                     num_thread=1)
    runner = await make_engine("ctransformers").start(spec)
    try:
        opts = SamplingOptions(temperature=0.0, num_predict=20)
        items = [i async for i in runner.complete(Completion("hello world", opts, return_context=True))]
        text = "".join(i.text for i in items if isinstance(i, CompletionChunk))
        done = items[-1]
        assert isinstance(done, CompletionDone)
        assert done.eval_count == 20 and done.prompt_eval_count == 3 and done.done_reason == "length"
        assert len(done.context) == 23

        stop = text.split()[3]
        stopped = [i async for i in runner.complete(Completion("hello world", SamplingOptions(
            temperature=0.0, num_predict=20, stop=(stop,))))]
        assert stopped[-1].done_reason == "stop"  # type: ignore[union-attr]
        assert stop not in "".join(i.text for i in stopped if isinstance(i, CompletionChunk))

        # More tokens than characters (byte fallback): ctransformers' own tokenize() would overflow.
        tokens = await runner.tokenize("ü€😀 ü€😀")
        assert len(tokens) > len("ü€😀 ü€😀") + 1
        assert (await runner.detokenize(tokens)).strip() == "ü€😀 ü€😀"

        with pytest.raises(UnsupportedCapability):
            async for _ in runner.complete(Completion("x", SamplingOptions(grammar='root ::= "a"'))):
                pass
        embedded = await runner.embed(["hello", "the sky"], normalize=True)
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 64
    finally:
        await runner.close()
    llm = AutoModelForCausalLM.from_pretrained(str(model), model_type="llama", context_length=256, threads=1)
    assert text == llm("hello world", max_new_tokens=20, temperature=0.0, repetition_penalty=1.1,
                       last_n_tokens=64, top_k=40, top_p=0.9)


def test_engine_name() -> None:
    assert CTransformersEngine().name == "ctransformers"
