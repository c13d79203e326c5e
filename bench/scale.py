"""A cluster of real nodes on one machine: convergence, failure detection, idle cost, sync traffic, repair.

Usage: python bench/scale.py [--nodes 30] [--kill 3] [--leave 3] [--idle-s 60]

Every node is an ``omx start`` process with its own home, its own 127.0.0.N
address with the default ports and its own Serf agent (profile ``local``),
as the end-to-end tests start them (tests/support/cluster.py). The script:

1. starts node 1, then all the others at once with ``--join`` node 1, and
   times until every node sees every node alive;
2. creates a small generated GGUF model on one node with
   ``replication.factor`` 2 and waits until it has 2 holders;
3. lets the cluster sit idle, then measures over ``--idle-s`` seconds each
   node's CPU time (node + Serf agent + runners, from ``/proc``) and RSS;
4. starts one more node (a join), ``kill -9``s ``--kill`` nodes (their whole
   process group and agent) and stops ``--leave`` nodes gracefully, timing
   until every survivor sees them ``failed`` / ``left``;
5. ``kill -9``s a holder of the model and times until the factor is restored.

Around every membership change it sums, over the whole cluster, the peer
sync requests the nodes made (``omx_peer_sync_fetches_total`` and
``omx_peer_sync_bytes_total`` by kind: inventory, functions, load), minus
what the same window costs an idle cluster. Figures only, nothing asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Cluster, ClusterNode, lease_host  # noqa: E402
from tests.support.node import create_model  # noqa: E402
from tests.support.serf import require_serf  # noqa: E402
from tests.support.transfer import write_big_gguf  # noqa: E402

CHUNK = 64 * 1024
MODEL = "scale-model:latest"
ENV = {"OMX_REPLICATION__FACTOR": "2", "OMX_MODELS__CHUNK_SIZE": str(CHUNK), "OMX_MODELS__REGISTRY": "127.0.0.1:9",
       "OMX_WEB__ENABLED": "false"}
KINDS = ("inventory", "functions", "load")
TICK = os.sysconf("SC_CLK_TCK")
DEADLINE_S = 180.0


# ------------------------------------------------------------------ /proc


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    """``pid`` and all its descendants (the node, its Serf agent, its runners)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_ticks(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def serf_share(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "serf":
                out.append(pid)
        except OSError:
            continue
    return out


# ------------------------------------------------------------------ cluster helpers


def alive_nodes(cluster: Cluster) -> list[ClusterNode]:
    return [n for n in [*cluster.nodes, *cluster.extra] if n.proc is not None]


def sync_totals(nodes: list[ClusterNode]) -> dict[str, float]:
    """Peer sync requests and bytes made by ``nodes``, summed (``fetches.KIND``, ``bytes.KIND``)."""

    def one(node: ClusterNode) -> dict[str, float]:
        got: dict[str, float] = {}
        try:
            text = httpx.get(node.url + "/metrics", timeout=20).text
        except httpx.HTTPError:
            return got
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "omx_peer_sync_fetches_total":
                    got[f"fetches.{s.labels['kind']}"] = got.get(f"fetches.{s.labels['kind']}", 0) + s.value
                elif s.name == "omx_peer_sync_bytes_total":
                    got[f"bytes.{s.labels['kind']}"] = got.get(f"bytes.{s.labels['kind']}", 0) + s.value
                elif s.name == "omx_http_requests_total" and s.labels.get("handler", "").startswith("peer_"):
                    key = f"served.{s.labels['handler']}"
                    got[key] = got.get(key, 0) + s.value
        return got

    total: dict[str, float] = {}
    with ThreadPoolExecutor(8) as pool:
        for got in pool.map(one, nodes):
            for k, v in got.items():
                total[k] = total.get(k, 0) + v
    return total


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


def statuses(node: ClusterNode) -> tuple[set[str], int]:
    """The alive members ``node`` sees and how many members it counts (all but those that left).

    ``/api/distributed/status`` rather than ``/nodes``: asking for ``/nodes`` also polls every member's load.
    """
    r = httpx.get(node.url + "/api/distributed/status", timeout=20)
    r.raise_for_status()
    doc = r.json()
    return set(doc["active_nodes"]), int(doc["cluster_size"])


def wait_all(observers: list[ClusterNode], ok: Callable[[tuple[set[str], int]], bool], what: str) -> float:
    """Poll every observer (round robin, each until it is done); seconds until all were."""
    started = time.monotonic()
    pending = list(observers)
    while pending:
        if time.monotonic() - started > DEADLINE_S:
            raise SystemExit(f"timed out waiting for {what} ({len(pending)} nodes not there)")
        still = []
        for node in pending:
            try:
                if not ok(statuses(node)):
                    still.append(node)
            except httpx.HTTPError:
                still.append(node)
        pending = still
        if pending:
            time.sleep(0.2)
    return time.monotonic() - started


def holders(node: ClusterNode) -> set[str]:
    r = httpx.get(node.url + "/api/distributed/models", timeout=20)
    rows = {m["name"]: m for m in r.json()["models"]}
    row = rows.get(MODEL, {})
    return set(row.get("nodes", [])) if row.get("status") == "ready" else set()


def wait_holders(observers: list[ClusterNode], count: int, exclude: set[str]) -> float:
    """Until every observer reports ``count`` ready holders, none of them in ``exclude``."""

    started = time.monotonic()
    pending = list(observers)
    while pending:
        if time.monotonic() - started > DEADLINE_S:
            raise SystemExit("timed out waiting for the replication factor")
        pending = [n for n in pending if not ((h := holders(n)) and len(h) == count and not h & exclude)]
        if pending:
            time.sleep(0.25)
    return time.monotonic() - started


def in_parallel(fn: Callable[[ClusterNode], object], nodes: list[ClusterNode]) -> None:
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(fn, nodes))


# ------------------------------------------------------------------ phases


def idle_cost(nodes: list[ClusterNode], seconds: float) -> list[tuple[str, float, float, float, float]]:
    """Per node: (label, ms/s of CPU in all, ms/s of which its serf agent, RSS MiB all, RSS MiB serf)."""
    children = _children()
    trees = {n.label: tree(n.proc.proc.pid, children) for n in nodes if n.proc is not None}
    serfs = {k: serf_share(v) for k, v in trees.items()}
    before = {k: (cpu_ticks(v), cpu_ticks(serfs[k])) for k, v in trees.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    after = {k: (cpu_ticks(v), cpu_ticks(serfs[k])) for k, v in trees.items()}
    wall = time.monotonic() - t0
    rows = []
    for label, pids in trees.items():
        total = (after[label][0] - before[label][0]) / TICK * 1000 / wall
        serf = (after[label][1] - before[label][1]) / TICK * 1000 / wall
        rows.append((label, total, serf, rss_kib(pids) / 1024, rss_kib(serfs[label]) / 1024))
    return rows


def report_sync(label: str, change: dict[str, float], idle_rate: dict[str, float], seconds: float,
                changes: int, n: int) -> None:
    print(f"  {label}: {changes} change(s), {n} nodes, window {seconds:.1f} s")
    for kind in KINDS:
        fetched = change.get(f"fetches.{kind}", 0) - idle_rate.get(f"fetches.{kind}", 0) * seconds
        nbytes = change.get(f"bytes.{kind}", 0) - idle_rate.get(f"bytes.{kind}", 0) * seconds
        print(f"    {kind:<10} {fetched / changes:8.1f} fetches/change  {nbytes / changes / 1024:9.1f} KiB/change"
              f"  (raw {change.get(f'fetches.{kind}', 0):.0f} fetches, {change.get(f'bytes.{kind}', 0) / 1024:.1f}"
              " KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--kill", type=int, default=3)
    parser.add_argument("--leave", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle CPU window (/proc counts 10 ms ticks)")
    parser.add_argument("--settle-s", type=float, default=12.0, help="quiet time after each change")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' homes (logs) after the run")
    args = parser.parse_args()
    require_serf()
    t_start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="omx-scale-"))
    cluster = Cluster(root)
    try:
        run(cluster, root, args)
    finally:
        in_parallel(lambda node: node.stop(), alive_nodes(cluster))  # close() stops them one by one
        cluster.close()
        if not args.keep:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
    print(f"total wall time {time.monotonic() - t_start:.0f} s")


def run(cluster: Cluster, root: Path, args: argparse.Namespace) -> None:
    n = args.nodes
    print(f"load average at start: {os.getloadavg()[0]:.2f}  (nodes={n}, cores={os.cpu_count()})")
    # ---- start and converge
    for i in range(n):
        cluster.nodes.append(ClusterNode(f"n{i + 1:02d}", root / f"n{i + 1:02d}", lease_host()))
    seed = cluster.nodes[0]
    t0 = time.monotonic()
    seed.start((), ENV)
    secret = {"OMX_CLUSTER_SECRET": cluster.secret_hex, **ENV}
    in_parallel(lambda node: node.start(("--join", seed.p2p), secret), cluster.nodes[1:])
    started = time.monotonic() - t0
    ids = {node.node_id for node in cluster.nodes}
    converge = wait_all(cluster.nodes, lambda st: ids <= st[0], "all alive")
    print(f"start {n} nodes (node 1, then {n - 1} at once joining it): {started:.1f} s until all answer;"
          f" then {converge:.1f} s until every node sees all {n} alive ({started + converge:.1f} s in all)")

    # ---- a model on 2 nodes (factor 2)
    gguf = write_big_gguf(root / "scale.gguf", 2 << 20, seed=5)
    with cluster.nodes[1].client() as client:
        create_model(client, MODEL, gguf)
    t_rep = wait_holders([cluster.nodes[1]], 2, set())
    held = holders(cluster.nodes[1])
    print(f"model of {gguf.stat().st_size / 2**20:.1f} MiB created on one node with factor 2: second copy"
          f" in {t_rep:.1f} s")

    # ---- idle
    time.sleep(args.settle_s)
    nodes = alive_nodes(cluster)
    s0 = sync_totals(nodes)
    t_idle0 = time.monotonic()
    rows = idle_cost(nodes, args.idle_s)
    s1 = sync_totals(nodes)
    idle_wall = time.monotonic() - t_idle0
    idle_rate = {k: v / idle_wall for k, v in diff(s1, s0).items()}
    totals = [r[1] for r in rows]
    print(f"idle, over {args.idle_s:.0f} s (load average {os.getloadavg()[0]:.2f}): CPU per node (node + serf +"
          f" runners) median {statistics.median(totals):.2f} ms/s, min {min(totals):.2f}, max {max(totals):.2f};"
          f" of which serf median {statistics.median(r[2] for r in rows):.2f} ms/s;"
          f" all {len(rows)} nodes {sum(totals) / 10:.1f} % of one core")
    print(f"  RSS per node median {statistics.median(r[3] for r in rows):.0f} MiB (serf"
          f" {statistics.median(r[4] for r in rows):.0f} MiB), all nodes {sum(r[3] for r in rows) / 1024:.2f} GiB")
    print("  idle sync traffic, whole cluster: " + ", ".join(
        f"{k} {v:.2f}/s" for k, v in idle_rate.items() if k.startswith(("fetches", "served")) and v))
    for label, total, serf, rss, rss_serf in sorted(rows):
        print(f"    {label} cpu {total:6.2f} ms/s (serf {serf:5.2f})  rss {rss:6.0f} MiB (serf {rss_serf:4.0f})")

    # ---- one join
    s0, t0 = sync_totals(alive_nodes(cluster)), time.monotonic()
    joiner = cluster.new_node(f"n{n + 1:02d}")
    joiner.start(("--join", seed.p2p), secret)
    everyone = alive_nodes(cluster)
    t_join = wait_all(everyone, lambda st: joiner.node_id in st[0], "the joiner alive")
    time.sleep(args.settle_s)
    change = diff(sync_totals(alive_nodes(cluster)), s0)
    print(f"one node joins: every node sees it alive {t_join:.1f} s after it answered")
    report_sync("sync traffic for the join", change, idle_rate, time.monotonic() - t0, 1, len(everyone))

    # ---- kill -9 and graceful leave
    holder_ids = held
    candidates = [node for node in cluster.nodes[2:] if node.node_id not in holder_ids]
    killed, leaving = candidates[:args.kill], candidates[args.kill:args.kill + args.leave]
    survivors = [node for node in alive_nodes(cluster) if node not in killed and node not in leaving]
    s0, t0 = sync_totals(survivors + leaving), time.monotonic()
    in_parallel(lambda node: node.kill9(), killed)
    dead = {node.node_id for node in killed}
    members = len(alive_nodes(cluster)) + len(killed)
    t_fail = wait_all(survivors + leaving, lambda st: not dead & st[0] and st[1] == members, "failed")
    time.sleep(args.settle_s)
    change = diff(sync_totals(survivors + leaving), s0)
    print(f"kill -9 of {len(killed)} nodes: every other node sees them failed after {t_fail:.1f} s")
    report_sync("sync traffic for the failures", change, idle_rate, time.monotonic() - t0, len(killed),
                len(survivors) + len(leaving))
    s0, t0 = sync_totals(survivors), time.monotonic()
    in_parallel(lambda node: node.stop(), leaving)
    gone = {node.node_id for node in leaving}
    t_left = wait_all(survivors, lambda st: not gone & st[0] and st[1] == members - len(leaving), "left")
    time.sleep(args.settle_s)
    change = diff(sync_totals(survivors), s0)
    print(f"graceful stop of {len(leaving)} nodes: every survivor sees them left after {t_left:.1f} s"
          " (measured from the stop signals)")
    report_sync("sync traffic for the leaves", change, idle_rate, time.monotonic() - t0, len(leaving),
                len(survivors))

    # ---- a holder dies: the factor comes back
    by_id = {node.node_id: node for node in survivors}
    victim = by_id[sorted(holder_ids - {cluster.nodes[1].node_id})[0]] if holder_ids - {cluster.nodes[1].node_id} \
        else by_id[sorted(holder_ids)[0]]
    observers = [node for node in survivors if node is not victim]
    t0 = time.monotonic()
    victim.kill9()
    t_seen = wait_all(observers[:1], lambda st: victim.node_id not in st[0], "the holder failed")
    t_restored = wait_holders(observers, 2, {victim.node_id})
    print(f"kill -9 of a holder of the model (factor 2, {len(observers)} survivors): seen failed after"
          f" {t_seen:.1f} s; factor restored (2 ready holders seen by every survivor) {t_seen + t_restored:.1f} s"
          f" after the kill")


if __name__ == "__main__":
    main()
