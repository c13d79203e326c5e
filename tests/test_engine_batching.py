"""Continuous batching: parallel requests are sequences of one llama.cpp context, decoded together."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import llama_cpp
import pytest

from omx.errors import InvalidRequest
from omx.protocols import Completion, CompletionChunk, CompletionDone, SamplingOptions
from omx.runtime.engine import LlamaCppEngine, ProcessRunner
from tests.conftest import TINY_TEMPLATE
from tests.support.node import create_model, start_node
from tests.support.serf import eventually
from tests.support.tiny_gguf import write_tiny_llama
from tests.test_engine_llama import bare, bare_kwargs, collect, spec_for

GREEDY = SamplingOptions(temperature=0.0, num_predict=32)
PROMPTS = ["hello world", "the sky is blue", "why", "one two three four", "water people time", "make thing see"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "plain": write_tiny_llama(root / "plain.gguf", seed=1),
        "long": write_tiny_llama(root / "long.gguf", seed=5, n_ctx=8192),
    }


@pytest.fixture
async def runner(models: dict[str, Path]):
    r = await LlamaCppEngine().start(spec_for(models["plain"], num_parallel=4))
    yield r
    await r.close()


async def test_concurrent_requests_carry_only_their_own_text(models: dict[str, Path], runner: ProcessRunner) -> None:
    assert runner.info["batching"] is True and runner.info["n_parallel"] == 4
    llm = bare(models["plain"])
    alone = [llm.create_completion(p, **bare_kwargs(GREEDY))["choices"][0]["text"] for p in PROMPTS]
    # Six requests on four sequences: two wait for a sequence, then join the running batch.
    results = await asyncio.gather(*(collect(runner, Completion(p, GREEDY)) for p in PROMPTS))
    identical = 0
    for prompt, (chunks, done), expected in zip(PROMPTS, results, alone, strict=True):
        text = "".join(chunks)
        assert expected.startswith(chunks[0]), "a request must start exactly as it does alone"
        assert done.eval_count == 32 and done.prompt_eval_count == len(llm.tokenize(prompt.encode()))
        identical += text == expected
    print(f"identical to the end: {identical}/{len(PROMPTS)}")
    # llama.cpp's CPU kernels give this f32 model the same logits whatever the batch holds.
    assert identical == len(PROMPTS)
    # Alone again after all that (finished sequences keep their cells for prefix reuse): bare's output.
    for prompt in PROMPTS:
        chunks, _ = await collect(runner, Completion(prompt + " again", GREEDY))
        assert "".join(chunks) == llm.create_completion(prompt + " again", **bare_kwargs(GREEDY))["choices"][0]["text"]


async def test_disconnect_frees_the_sequence_and_others_continue(models: dict[str, Path]) -> None:
    runner = await LlamaCppEngine().start(spec_for(models["plain"], num_parallel=2))
    try:
        long = SamplingOptions(temperature=0.0, num_predict=200)
        leaving = runner.complete(Completion("hello world", long))
        staying = asyncio.ensure_future(collect(runner, Completion("the sky is blue", long)))
        for _ in range(3):
            assert isinstance(await leaving.__anext__(), CompletionChunk)
        await leaving.aclose()
        # Both sequences were taken: a newcomer runs at once only if the leaver's sequence was freed.
        newcomer = await collect(runner, Completion("why", SamplingOptions(temperature=0.0, num_predict=4)))
        assert newcomer[1].eval_count == 4
        assert not staying.done(), "the newcomer must not have waited for the other stream to end"
        chunks, done = await staying
        await eventually(lambda: runner.cancelled_generations == 1, "the runner reports the cancel")
    finally:
        await runner.close()
    expected = bare(models["plain"]).create_completion("the sky is blue", **bare_kwargs(long))["choices"][0]["text"]
    assert done.eval_count == 200 and "".join(chunks) == expected


async def test_a_request_left_while_waiting_for_a_sequence_never_runs(models: dict[str, Path]) -> None:
    runner = await LlamaCppEngine().start(spec_for(models["long"], num_ctx=2048, num_parallel=1))
    try:
        running = runner.complete(Completion("hello world", SamplingOptions(temperature=0.0, num_predict=1900)))
        assert isinstance(await running.__anext__(), CompletionChunk)
        waiting = runner.complete(Completion("why", SamplingOptions(temperature=0.0, num_predict=8)))
        await waiting.aclose()  # its frame went to the runner when complete() returned
        await eventually(lambda: runner.cancelled_generations == 1, "the runner drops the waiting request")
        during = await runner.stats()
        async for _ in running:
            pass
    finally:
        await runner.close()
    # The long stream still held the only sequence: the left request was never placed on one.
    assert during["admitted"] == 1


async def test_mixed_options_per_request_are_honoured(models: dict[str, Path], runner: ProcessRunner) -> None:
    llm = bare(models["plain"])
    free = llm.create_completion("hello world", **bare_kwargs(GREEDY))["choices"][0]["text"]
    stop = free.split()[len(free.split()) // 2]
    stopping = SamplingOptions(temperature=0.0, num_predict=32, stop=(stop,))
    seeded = SamplingOptions(temperature=0.9, top_k=20, top_p=0.8, min_p=0.02, seed=1234, num_predict=30,
                             presence_penalty=0.3, frequency_penalty=0.2)
    short = SamplingOptions(temperature=0.0, num_predict=5, repeat_penalty=1.5, repeat_last_n=4)
    grammar = r'root ::= "{" "\"n\"" ":" [0-9]{1,3} "}"'
    constrained = SamplingOptions(temperature=0.0, num_predict=20, grammar=grammar)
    (s_chunks, s_done), (r_chunks, _), (h_chunks, h_done), (g_chunks, _) = await asyncio.gather(
        collect(runner, Completion("hello world", stopping)),
        collect(runner, Completion("the model", seeded)),
        collect(runner, Completion("one two", short)),
        collect(runner, Completion("data", constrained)),
    )
    assert "".join(s_chunks) == llm.create_completion("hello world", **bare_kwargs(stopping))["choices"][0]["text"]
    assert s_done.done_reason == "stop" and stop not in "".join(s_chunks)
    assert "".join(r_chunks) == llm.create_completion("the model", **bare_kwargs(seeded))["choices"][0]["text"]
    short_bare = bare(models["plain"], last_n_tokens_size=4).create_completion("one two", **bare_kwargs(short))
    assert "".join(h_chunks) == short_bare["choices"][0]["text"]
    assert h_done.eval_count == 5 and h_done.done_reason == "length"
    assert isinstance(json.loads("".join(g_chunks))["n"], int)


async def test_a_long_prompt_enters_in_chunks_while_others_stream(models: dict[str, Path]) -> None:
    chunk = 32
    runner = await LlamaCppEngine(prefill_chunk=chunk).start(spec_for(models["long"], num_ctx=2048,
                                                                       num_parallel=2))
    events: list[str] = []

    async def consume(name: str, request: Completion) -> CompletionDone:
        async for item in runner.complete(request):
            if isinstance(item, CompletionDone):
                events.append(f"{name}:done")
                return item
            events.append(name)
        raise AssertionError("no done")

    try:
        streaming = asyncio.ensure_future(consume("s", Completion("hello", SamplingOptions(temperature=0.0,
                                                                                           num_predict=1900))))
        await eventually(lambda: events.count("s") >= 3, "the first stream is generating")
        prompt = "the sky " * 300
        n_prompt = len(await runner.tokenize(prompt))
        mark = len(events)
        long_done = await consume("l", Completion(prompt, SamplingOptions(temperature=0.0, num_predict=2)))
        first_long = events.index("l", mark)
        during = events[mark:first_long].count("s")
        await runner._call("tokenize", "x", True)  # the runner is still responsive
        streaming.cancel()
    finally:
        await runner.close()
    assert long_done.prompt_eval_count == n_prompt
    # The stream must still be running for this to measure anything (a tiny model is fast).
    assert "s:done" not in events[:first_long]
    # One decode step per chunk of the long prompt, each also carrying the stream's next token:
    # without chunked prefill the stream would get one or two tokens while the prompt is read.
    steps = -(-n_prompt // chunk)
    assert during >= steps // 2, f"stream got {during} tokens while a {n_prompt}-token prompt was read"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_parallel_sequences_share_one_copy_of_the_weights(tmp_path: Path) -> None:
    # Wide enough that the weights (~57 MB) dwarf the runtime: four contexts would hold four copies.
    wide = write_tiny_llama(tmp_path / "wide.gguf", seed=9, n_layer=4, n_embd=512, n_ff=1536, n_head=8)
    n_ctx, sizes = 256, {}
    for parallel in (1, 4):
        runner = await LlamaCppEngine().start(spec_for(wide, num_ctx=n_ctx, num_parallel=parallel))
        try:
            await asyncio.gather(*(collect(runner, Completion(f"hello world {i}", SamplingOptions(
                temperature=0.0, num_predict=8))) for i in range(parallel)))
            sizes[parallel] = _rss(runner.pid)
        finally:
            await runner.close()
    kv_per_sequence = 2 * 4 * n_ctx * 512 * 2  # K and V, 4 layers, f16 cells of width n_embd
    grew = sizes[4] - sizes[1]
    print(f"RSS num_parallel 1: {sizes[1] / 1e6:.1f} MB, 4: {sizes[4] / 1e6:.1f} MB, +{grew / 1e6:.1f} MB")
    assert grew <= 3 * kv_per_sequence + 16 * 2**20, "four sequences must cost their KV cache, not more weights"


def test_embedding_inputs_share_one_decode_and_equal_one_by_one(models: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from omx.runtime.engine._batch_backend import BatchBackend

    backend = BatchBackend({"model_path": str(models["plain"]), "n_ctx": 256, "n_batch": 256, "n_threads": 1})
    texts = ["hello world", "the sky is blue", "why", "one two three four", "water people time"]
    alone = [backend.embed([text], normalize=False, truncate=True)[0][0] for text in texts]
    real = llama_cpp.llama_cpp.llama_decode
    calls: list[int] = []

    def counting(ctx: object, batch: llama_cpp.llama_batch) -> int:
        calls.append(batch.n_tokens)
        return int(real(ctx, batch))

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", counting)
    together, count = backend.embed(texts, normalize=False, truncate=True)
    # Every input is a sequence of one decode call, pooled on its own.
    assert calls == [count]
    assert len(together) == len(texts)
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert together[0] != pytest.approx(together[1], rel=1e-2)


def test_a_new_request_keeps_the_busy_sequences_together() -> None:
    from omx.runtime.engine._slots import Slot, choose_slot, runs

    assert (runs([]), runs([2, 0, 1]), runs([0, 3, 5, 6])) == (0, 1, 3)
    slots = [Slot(seq) for seq in range(4)]
    slots[3].cached = [1, 2, 3]
    # Sequences 0 and 2 busy: sequence 1 closes the gap although sequence 3 holds the prompt's prefix.
    assert choose_slot([slots[1], slots[3]], [0, 2], [1, 2, 3, 4]).seq == 1
    # Nothing busy: the cached prefix decides.
    assert choose_slot(slots, [], [1, 2, 3, 4]).seq == 3


def test_room_in_a_shared_cache_comes_from_idle_prefixes_least_recently_used_first() -> None:
    from omx.runtime.engine._slots import Slot, cells_to_free, preemption_victim

    slots = [Slot(seq) for seq in range(4)]
    for slot, (cached, used, busy) in zip(slots, [(30, 4, True), (20, 1, False), (20, 2, False), (10, 3, False)],
                                          strict=True):
        slot.cached, slot.used, slot.gen = list(range(cached)), used, object() if busy else None
    # 100 cells, 80 held: 20 free. A running sequence's cells are never taken.
    assert cells_to_free(slots, 100, 20) == []
    assert cells_to_free(slots, 100, 21) == [slots[1]]
    assert cells_to_free(slots, 100, 50) == [slots[1], slots[2]]
    assert cells_to_free(slots, 100, 61) == [slots[1], slots[2], slots[3]]
    assert cells_to_free(slots, 100, 50, keep=slots[2]) == [slots[1], slots[3]]
    assert cells_to_free(slots, 100, 51, keep=slots[2]) is None
    assert cells_to_free(slots, 100, 71) is None
    # The request admitted last steps aside; one request alone never does.
    assert preemption_victim(slots) is None
    slots[2].gen = object()
    assert preemption_victim(slots) is slots[0]
    slots[0].used = 0
    assert preemption_victim(slots) is slots[2]


async def test_a_shared_cache_admits_by_room_and_sets_the_last_request_aside_when_full(
        models: dict[str, Path]) -> None:
    # 2 x 128 cells shared by up to 8 sequences: eight short requests run together where a cache per
    # sequence would run two at a time; 8 x ~105 cells do not fit in 256, so some step aside and come back.
    engine = LlamaCppEngine(kv_unified=True, max_sequences=8)
    runner = await engine.start(spec_for(models["plain"], num_ctx=128, num_parallel=2))
    opts = SamplingOptions(temperature=0.0, num_predict=100)
    prompts = [*PROMPTS, "data", "the model"]
    try:
        assert (runner.info["sequences"], runner.info["kv_unified"], runner.info["n_ctx"]) == (8, True, 128)
        cells = runner.info["kv_cells"]
        assert cells >= 256
        results = await asyncio.gather(*(collect(runner, Completion(p, opts)) for p in prompts))
        stats = await runner.stats()
        with pytest.raises(InvalidRequest, match="exceed context window of 128"):
            await collect(runner, Completion("the sky " * 80, opts))
    finally:
        await runner.close()
    llm = bare(models["plain"], n_ctx=128)
    for prompt, (chunks, done) in zip(prompts, results, strict=True):
        expected = llm.create_completion(prompt, **bare_kwargs(opts))["choices"][0]["text"]
        assert done.eval_count == 100 and done.prompt_eval_count == len(llm.tokenize(prompt.encode()))
        # Set aside or not, a request streams its own text once, in order (this f32 model's logits do not
        # depend on what else the batch holds, so it is bare's text exactly).
        assert "".join(chunks) == expected
    print(f"shared cache of {cells} cells: {stats}")
    assert runner.preemptions == stats["preemptions"], "the node counts what the runner reports"
    assert stats["peak_running"] > 2, "more requests than num_parallel must run together"
    assert stats["preemptions"] > 0, "the cache filled: a request must have stepped aside"


def test_a_node_with_a_shared_cache_serves_more_requests_at_once_than_num_parallel(tmp_path: Path,
                                                                                   tiny_gguf: Path) -> None:
    node = start_node(tmp_path / "home", env={"OMX_ENGINE__NUM_PARALLEL": "1", "OMX_ENGINE__KV_UNIFIED": "true",
                                              "OMX_ENGINE__MAX_SEQUENCES": "6"})
    try:
        with node.client() as http:
            create_model(http, "tiny", tiny_gguf, template=TINY_TEMPLATE, parameters={"num_ctx": 256})

            async def generate(prompt: str) -> dict[str, object]:
                async with httpx.AsyncClient(base_url=node.url, timeout=120) as client:
                    r = await client.post("/api/generate", json={
                        "model": "tiny", "prompt": prompt, "stream": False,
                        "options": {"temperature": 0, "num_predict": 200}})
                    assert r.status_code == 200, r.text
                    return dict(r.json())

            async def all_at_once() -> list[dict[str, object]]:
                return await asyncio.gather(*(generate(p) for p in PROMPTS))

            answers = asyncio.run(all_at_once())
            runners = http.get("/api/distributed/status").json()["runner_stats"]["runners"]
    finally:
        node.stop()
    assert [a["eval_count"] for a in answers] == [200] * len(PROMPTS)
    (runner,) = runners
    # One shared cache of 256 cells (num_ctx x num_parallel), six sequences: six requests at once, and
    # six of ~205 cells each do not fit: requests stepped aside, and the status says how often.
    assert runner["slots"] == 6 and runner["context_length"] == 256
    assert runner["preemptions"] > 0


@pytest.mark.parametrize("seed", [0, 5])
async def test_a_shared_cache_under_a_random_mix_of_requests_and_leavers(models: dict[str, Path], seed: int) -> None:
    # Random prompts, lengths, arrival times and clients that leave, through a small shared cache: every
    # request that stays gets bare's text and counts, whether it stepped aside or not.
    rnd = random.Random(seed)
    words = " ".join(PROMPTS).split()
    llm = bare(models["plain"], n_ctx=128)
    jobs = []
    for _ in range(24):
        prompt = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 40)))
        jobs.append((prompt, rnd.randint(1, 120 - len(llm.tokenize(prompt.encode()))), rnd.choice([None, None, 0, 3]),
                     rnd.choice([0.0, 0.0, rnd.random() * 0.05])))
    engine = LlamaCppEngine(kv_unified=True, max_sequences=rnd.choice([6, 12]), prefill_chunk=rnd.choice([4, 128]))
    runner = await engine.start(spec_for(models["plain"], num_ctx=128, num_parallel=2))

    async def run(prompt: str, n: int, leave_after: int | None, delay: float) -> tuple[str, CompletionDone] | None:
        await asyncio.sleep(delay)
        stream = runner.complete(Completion(prompt, SamplingOptions(temperature=0.0, num_predict=n)))
        chunks: list[str] = []
        async for item in stream:
            if isinstance(item, CompletionDone):
                return "".join(chunks), item
            chunks.append(item.text)
            if leave_after is not None and len(chunks) > leave_after:
                await stream.aclose()
                return None
        raise AssertionError("no done")

    try:
        results = await asyncio.gather(*(run(*job) for job in jobs))
        stats = await runner.stats()
    finally:
        await runner.close()
    print(f"seed {seed}: {stats}")
    assert stats["preemptions"] > 0
    for (prompt, n, _, _), result in zip(jobs, results, strict=True):
        if result is None:
            continue
        expected = llm.create_completion(prompt, **bare_kwargs(SamplingOptions(temperature=0.0, num_predict=n)))
        assert result[0] == expected["choices"][0]["text"]
        assert result[1].eval_count == expected["usage"]["completion_tokens"]
