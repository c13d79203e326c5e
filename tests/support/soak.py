"""The traffic and the bookkeeping of the chaos soak (``tests/test_soak.py``).

:class:`Soak` owns a running :class:`Cluster`: client threads send generate,
chat and embed requests (plain and streamed) through random nodes that are up;
a sampler records each node's memory (its whole process tree); the test's
control loop kills, restarts and reshapes models and records what it saw.

A request whose *entry* node was killed while it ran is counted apart
(``entry_killed``): nothing could have answered it. Every other request must
succeed, and a stream may only break after its first byte and with an
``{"error"}`` object as its last line.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from tests.support.cluster import Cluster, ClusterNode

__all__ = ["KINDS", "Soak"]

KINDS = ("generate", "generate-stream", "chat", "chat-stream", "embed")
REQUEST_TIMEOUT_S = 120.0
OPTIONS = {"num_predict": 12, "temperature": 0, "seed": 1}


@dataclass
class Outcome:
    kind: str
    node: str
    result: str
    detail: str = ""


@dataclass
class Soak:
    cluster: Cluster
    models: list[str]
    seed: int = 0
    rng: random.Random = field(init=False)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    up: dict[str, bool] = field(default_factory=dict)
    generation: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, str, int, int]] = field(default_factory=list)
    """(time, node label, generation, bytes) samples."""
    kills: list[dict[str, Any]] = field(default_factory=list)
    ops: list[dict[str, Any]] = field(default_factory=list)
    fsck: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for node in self.cluster.nodes:
            self.up[node.label] = True
            self.generation[node.label] = 0

    # ------------------------------------------------------------ node state

    def up_nodes(self) -> list[ClusterNode]:
        with self.lock:
            return [n for n in self.cluster.nodes if self.up[n.label] and n.proc is not None]

    def mark_down(self, node: ClusterNode) -> None:
        with self.lock:
            self.up[node.label] = False
            self.generation[node.label] += 1

    def mark_up(self, node: ClusterNode) -> None:
        with self.lock:
            self.up[node.label] = True

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(f"[{time.strftime('%H:%M:%S')}] {text}")

    # ------------------------------------------------------------ traffic

    def start(self, clients: int = 2, pause_s: tuple[float, float] = (0.3, 0.8)) -> None:
        for i in range(clients):
            t = threading.Thread(target=self._client, args=(i, pause_s), name=f"soak-client-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        sampler = threading.Thread(target=self._sampler, name="soak-rss", daemon=True)
        sampler.start()
        self.threads.append(sampler)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT_S + 10)

    def _client(self, index: int, pause_s: tuple[float, float]) -> None:
        rng = random.Random(self.seed * 100 + index)
        while not self.stop.is_set():
            nodes = self.up_nodes()
            if nodes:
                node = rng.choice(nodes)
                kind = rng.choice(KINDS)
                model = rng.choice(self.models)
                with self.lock:
                    gen = self.generation[node.label]
                outcome = self._request(node, kind, model, rng)
                with self.lock:
                    if outcome.result != "ok" and (self.generation[node.label] != gen or not self.up[node.label]):
                        outcome.result, outcome.detail = "entry_killed", outcome.detail
                    self.outcomes.append(outcome)
                if outcome.result not in ("ok", "entry_killed", "stream_error_object"):
                    self.problem(f"{kind} {model} via {node.label}: {outcome.result} {outcome.detail}")
            self.stop.wait(rng.uniform(*pause_s))

    @staticmethod
    def _body(kind: str, model: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
        stream = kind.endswith("-stream")
        words = " ".join(rng.choice(("the", "sky", "is", "blue", "hello", "world", "cluster")) for _ in range(4))
        if kind.startswith("generate"):
            return "/api/generate", {"model": model, "prompt": words, "stream": stream, "options": OPTIONS}
        if kind.startswith("chat"):
            return "/api/chat", {"model": model, "messages": [{"role": "user", "content": words}], "stream": stream,
                                 "options": OPTIONS}
        return "/api/embed", {"model": model, "input": [words]}

    def _request(self, node: ClusterNode, kind: str, model: str, rng: random.Random) -> Outcome:
        path, body = self._body(kind, model, rng)
        try:
            if body.get("stream"):
                return self._streamed(node, kind, path, body)
            r = httpx.post(node.url + path, json=body, timeout=REQUEST_TIMEOUT_S)
            doc = r.json()
            if r.status_code != 200 or "error" in doc:
                return Outcome(kind, node.label, "failed", f"{r.status_code} {r.text[:200]}")
            if kind == "embed" and not doc.get("embeddings"):
                return Outcome(kind, node.label, "failed", f"no embeddings: {r.text[:200]}")
            if kind != "embed" and doc.get("done") is not True:
                return Outcome(kind, node.label, "failed", f"not done: {r.text[:200]}")
            return Outcome(kind, node.label, "ok")
        except (httpx.HTTPError, ValueError) as exc:
            return Outcome(kind, node.label, "failed", repr(exc)[:200])

    def _streamed(self, node: ClusterNode, kind: str, path: str, body: dict[str, Any]) -> Outcome:
        last: Any = None
        got_bytes = False
        try:
            with httpx.stream("POST", node.url + path, json=body, timeout=REQUEST_TIMEOUT_S) as r:
                if r.status_code != 200:
                    return Outcome(kind, node.label, "failed_before_first_byte",
                                   f"{r.status_code} {r.read()[:200]!r}")
                for line in r.iter_lines():
                    got_bytes = True
                    if line.strip():
                        last = json.loads(line)
        except (httpx.HTTPError, ValueError) as exc:
            if not got_bytes:
                return Outcome(kind, node.label, "failed_before_first_byte", repr(exc)[:200])
            return Outcome(kind, node.label, "stream_broke_without_error", repr(exc)[:200])
        if isinstance(last, dict) and last.get("done") is True:
            return Outcome(kind, node.label, "ok")
        if isinstance(last, dict) and "error" in last:
            return Outcome(kind, node.label, "stream_error_object", str(last["error"])[:200])
        return Outcome(kind, node.label, "stream_broke_without_error", f"last line {str(last)[:200]}")

    # ------------------------------------------------------------ memory

    def _sampler(self, interval_s: float = 10.0) -> None:
        while not self.stop.is_set():
            for node in self.up_nodes():
                proc = node.proc
                if proc is None:
                    continue
                try:
                    root = psutil.Process(proc.proc.pid)
                    total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.Error:
                    continue
                with self.lock:
                    self.rss.append((time.monotonic(), node.label, self.generation[node.label], total))
            self.stop.wait(interval_s)

    def memory_growth(self, min_life_s: float = 150.0, warm_s: float = 45.0, ratio: float = 1.5,
                      slack: int = 96 << 20) -> list[str]:
        """Node processes that lived ``min_life_s`` and whose RSS grew past ``warm * ratio + slack``."""
        lives: dict[tuple[str, int], list[tuple[float, int]]] = {}
        for t, label, gen, rss in self.rss:
            lives.setdefault((label, gen), []).append((t, rss))
        found = []
        for (label, gen), samples in sorted(lives.items()):
            if samples[-1][0] - samples[0][0] < min_life_s:
                continue
            warm = next(rss for t, rss in samples if t - samples[0][0] >= warm_s)
            end = samples[-1][1]
            if end > warm * ratio + slack:
                found.append(f"node {label} (life {gen}) grew from {warm >> 20} MiB to {end >> 20} MiB")
        return found

    # ------------------------------------------------------------ summary

    def table(self, duration_s: float) -> str:
        lines = [f"omx chaos soak: {duration_s / 60:.1f} min, {len(self.cluster.nodes)} nodes, models "
                 f"{', '.join(self.models)}", "", "Requests by kind and outcome"]
        counts = Counter((o.kind, o.result) for o in self.outcomes)
        results = sorted({r for _, r in counts})
        lines.append(f"  {'kind':<16}" + "".join(f"{r:>28}" for r in results) + f"{'total':>8}")
        for kind in KINDS:
            row = [counts[(kind, r)] for r in results]
            lines.append(f"  {kind:<16}" + "".join(f"{c:>28}" for c in row) + f"{sum(row):>8}")
        lines.append(f"  {'all':<16}" + "".join(f"{sum(counts[(k, r)] for k in KINDS):>28}" for r in results)
                     + f"{len(self.outcomes):>8}")
        restores = [k["restore_s"] for k in self.kills if k.get("restore_s") is not None]
        lines += ["", f"Kills: {len(self.kills)}  (restarts ok: {sum(1 for k in self.kills if k.get('restarted'))})"]
        for k in self.kills:
            lines.append(f"  {k['at']:>7.0f}s  kill -9 {k['node']}  held {k['held']}  factor restored in "
                         f"{_fmt(k.get('restore_s'))}  rejoined in {_fmt(k.get('rejoin_s'))}")
        if restores:
            lines.append(f"  factor restore: p50 {statistics.median(restores):.1f}s  max {max(restores):.1f}s  "
                         f"({len(restores)} kills that took a copy)")
        lines += ["", f"Model operations: {len(self.ops)}"]
        for op in self.ops:
            lines.append(f"  {op['at']:>7.0f}s  {op['op']:<10} {op['model']:<22} {op['result']}  "
                         f"{_fmt(op.get('took_s'))}")
        lines += ["", "fsck"]
        by_when = Counter((f["when"], "clean" if not f["problems"] else "PROBLEMS") for f in self.fsck)
        for (when, verdict), n in sorted(by_when.items()):
            lines.append(f"  {when:<24} {verdict:<9} {n}")
        for f in self.fsck:
            for p in f["problems"]:
                lines.append(f"    {f['node']} ({f['when']}): {p}")
        lines += ["", "Memory (RSS of each node's process tree)"]
        lines.append(f"  {'node':<6}{'start MiB':>11}{'end MiB':>10}{'max MiB':>10}{'lives':>7}")
        for node in self.cluster.nodes:
            samples = [(t, rss, gen) for t, label, gen, rss in self.rss if label == node.label]
            if samples:
                lines.append(f"  {node.label:<6}{samples[0][1] >> 20:>11}{samples[-1][1] >> 20:>10}"
                             f"{max(s[1] for s in samples) >> 20:>10}{len({s[2] for s in samples}):>7}")
        growth = self.memory_growth()
        lines.append("  growth within one process life: " + ("; ".join(growth) if growth else "none beyond bound"))
        lines += ["", f"Problems: {len(self.problems)}"] + [f"  {p}" for p in self.problems[:40]]
        if len(self.problems) > 60:
            lines.append(f"  ... {len(self.problems) - 60} more ...")
        lines += [f"  {p}" for p in self.problems[max(40, len(self.problems) - 20):]]
        return "\n".join(lines)


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"
