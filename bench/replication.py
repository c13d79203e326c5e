"""Swarm replication over rate-limited links: time to reach 4 peers vs one 1-to-1 transfer, in one run.

Needs root: it builds its own network namespaces and removes them again (also on
Ctrl-C, SIGTERM and errors; leftovers of a run that was killed outright are
removed by the next run). Without root it says so and exits 0.

Topology: a hub namespace with a bridge; one seed and ``--peers`` (4) peers,
each in its own namespace with one veth link to the bridge, shaped with ``tc``
``tbf`` at ``--rate`` in both directions (so each node has that much upload and
download). Each namespace runs a real ``omx start`` node with its own Serf agent
(``local`` gossip profile, ``replication.factor`` 1 at start, no registry). A
management veth, unshaped, links this process to the bridge for API calls.

The seed gets a generated GGUF of ``--size`` bytes (``/api/blobs`` upload +
``/api/create``) before the links are shaped. Then:

(a) ``POST /api/distributed/replicate {"factor": 2}``: one peer fetches the model
    from the seed, i.e. one 1-to-1 transfer on the same links; timed until the
    model is on that peer. Factor 1 again drops the copy (its blob file is gone
    before going on).
(b) ``factor`` 5 (the seed and every peer): the peers fetch it at once, from the
    seed and from each other; timed until all hold it.

It prints both times and (b)/(a) (target <= 1.3; a star from the seed would
take 4x), and per node the bytes it received (by source kind) and served, from
``/metrics``, and the peers each one fetched from, so the swarm is visible.
Then, unless ``--no-loopback``, :mod:`peer_transfer` (in this folder) measures
loopback peer transfer vs ``curl`` and BLAKE3 indexing vs ``b3sum``.

Run (root): ``.venv/bin/python bench/replication.py [--size 1GiB] [--rate 200mbit]``
(``--keep`` keeps the nodes' homes and logs). The nodes get a random admin key
(``security.admin_keys``), since the bench's requests do not come from their own
machine. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
OMX = Path(sys.executable).with_name("omx")
MODEL = "bench-swarm:latest"
API_PORT = 8080
PREFIX = "omxb-"
WORK_PREFIX = "omx-bench-replication-"
ADMIN_KEY = secrets.token_hex(16)
"""The nodes' admin key (security.admin_keys): the bench's requests come from another address."""
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
_RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def sh(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


def rate_bits(rate: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate.strip().lower())
    if match is None:
        raise SystemExit(f"--rate {rate!r}: use e.g. 200mbit or 1gbit")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    from omx.runtime.config import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise SystemExit(f"--size: {exc}") from exc


# ---------------------------------------------------------------- namespaces


def _netns_pids(ns: str) -> list[int]:
    with contextlib.suppress(RuntimeError):
        return [int(p) for p in sh("ip", "netns", "pids", ns).split()]
    return []


def _delete_netns(ns: str) -> None:
    """Stop what still runs in ``ns`` (only processes this bench started there), then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and _netns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(RuntimeError):
        sh("ip", "netns", "del", ns)


def remove_leftovers() -> None:
    """Namespaces and homes of earlier runs of this bench whose process no longer exists."""
    for line in sh("ip", "netns", "list").splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            print(f"removing namespace {match.group(1)} left by an earlier run")
            _delete_netns(match.group(1))
    for home in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        match = re.match(rf"{WORK_PREFIX}(\d+)-", home.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            print(f"removing {home} left by an earlier run")
            shutil.rmtree(home, ignore_errors=True)


@dataclass
class Network:
    """The hub bridge, one namespace per node and the management link (see the module docstring)."""

    subnet: ipaddress.IPv4Network
    tag: str = field(default_factory=lambda: str(os.getpid()))
    namespaces: list[str] = field(default_factory=list)
    shaped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.tag}-hub"

    def address(self, i: int) -> str:
        return str(self.subnet.network_address + i + 1)

    def build(self, labels: list[str]) -> list[tuple[str, str]]:
        """Create the hub and a namespace per label; returns (namespace, address) per label."""
        prefix = self.subnet.prefixlen
        sh("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        mgmt = f"ob{self.tag}m"
        sh("ip", "link", "add", mgmt, "type", "veth", "peer", "name", "mgmt", "netns", self.hub)
        sh("ip", "-n", self.hub, "link", "set", "mgmt", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.subnet.broadcast_address - 1}/{prefix}", "dev", mgmt)
        sh("ip", "link", "set", mgmt, "up")
        out = []
        for i, label in enumerate(labels):
            ns, port = f"{PREFIX}{self.tag}-{label}", f"ob{self.tag}h{i}"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "add", port, "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/{prefix}", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            self.shaped += [(ns, "eth0"), (self.hub, port)]
            out.append((ns, self.address(i)))
        return out

    def shape(self, rate: str) -> None:
        """tbf at ``rate`` on both ends of every node's link: its upload and its download."""
        burst = max(256 << 10, int(rate_bits(rate) / 8 / 100))
        for ns, dev in self.shaped:
            sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
               "burst", str(burst), "latency", "50ms")

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            _delete_netns(ns)
        self.namespaces.clear()


# ---------------------------------------------------------------- nodes


@dataclass
class Node:
    label: str
    ns: str
    host: str
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    transfer_sources: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{API_PORT}"

    def get(self, path: str, timeout: float = 10) -> Any:
        r = httpx.get(self.url + path, timeout=timeout, headers=AUTH)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any) -> Any:
        r = httpx.post(self.url + path, json=body, timeout=60, headers=AUTH)
        if r.status_code != 200:
            raise RuntimeError(f"{self.label} {path}: {r.status_code} {r.text}")
        return r.json()

    def has_model(self) -> bool:
        """This node holds the model complete, by its own account (``/api/tags`` may list the cluster's)."""
        rows = {m["name"]: m for m in self.get("/api/distributed/models")["models"]}
        return self.node_id in rows.get(MODEL, {}).get("nodes", [])

    def blob_file(self, digest: str) -> Path:
        return self.home / "data" / "models" / "blobs" / digest.replace(":", "-")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10, headers=AUTH).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "omx_replication_bytes_received_total":
                    out["received " + s.labels.get("source", "?")] = s.value
                elif s.name == "omx_replication_bytes_served_total":
                    out["served"] = s.value
        return out

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.home / "node.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def start(self, env: dict[str, str], args: list[str]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith("OMX_")}
        full.update({"PYTHONUNBUFFERED": "1", **env})
        with open(self.home / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, str(OMX), "start", "--home", str(self.home), "--host", self.host,
                 "--api-port", str(API_PORT), *args], env=full, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            info = self.home / "run" / "node.json"
            if not info.exists():
                return False
            self.node_id = json.loads(info.read_text())["node_id"]
            return httpx.get(self.url + "/", timeout=2, headers=AUTH).status_code == 200

        until(ready, 90, f"node {self.label} to answer")


def stop_nodes(nodes: list[Node], grace: float = 20) -> None:
    """SIGTERM every node at once, then SIGKILL what still runs after ``grace`` seconds."""
    running = [n.proc for n in nodes if n.proc is not None and n.proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy; raise after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last!r})" if last else ""))


def _leave(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def unwind_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every ``finally`` runs."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _leave)


def hold_signals() -> None:
    """While cleaning up, a second Ctrl-C or SIGTERM must not cut the cleanup short."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


def release_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


# ---------------------------------------------------------------- the measurement


def create_model(seed: Node, work: Path, size: int) -> str:
    sys.path.insert(0, str(ROOT))
    from tests.support.transfer import sha256_of, write_big_gguf

    gguf = write_big_gguf(work / "bench.gguf", size, seed=7)
    digest = sha256_of(gguf)
    with open(gguf, "rb") as f:
        r = httpx.post(f"{seed.url}/api/blobs/{digest}", content=f, timeout=600, headers=AUTH)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"upload: {r.status_code} {r.text}")
    with httpx.stream("POST", seed.url + "/api/create", json={"model": MODEL, "files": {gguf.name: digest}},
                      timeout=600, headers=AUTH) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    if not lines or lines[-1] != {"status": "success"}:
        raise RuntimeError(f"create: {lines[-3:]}")
    gguf.unlink()
    until(lambda: any(m["name"] == MODEL for m in seed.get("/api/distributed/models")["models"]), 60,
          "the seed to list the model in /api/distributed/models")
    return digest


def replicate(seed: Node, peers: list[Node], factor: int, want: int, timeout: float) -> tuple[float, dict[str, float]]:
    """Set ``factor`` and time until ``want`` peers hold the model; per peer, when it got there."""
    started = time.monotonic()
    seed.post("/api/distributed/replicate", {"model": MODEL, "factor": factor})
    done: dict[str, float] = {}
    last_sources = 0.0
    deadline = started + timeout
    while len(done) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(done)} of {want} peers got the model in {timeout:.0f}s")
        for p in peers:
            if p.label not in done:
                with contextlib.suppress(httpx.HTTPError):
                    if p.has_model():
                        done[p.label] = time.monotonic() - started
        if time.monotonic() - last_sources > 1:
            last_sources = time.monotonic()
            for p in peers:
                with contextlib.suppress(httpx.HTTPError):
                    for t in p.get("/api/distributed/replication/status")["transfers"]:
                        p.transfer_sources.update(t["sources"])
        time.sleep(0.05)
    return max(done.values()), done


def drop_copies(seed: Node, peers: list[Node], digest: str) -> None:
    seed.post("/api/distributed/replicate", {"model": MODEL, "factor": 1})
    until(lambda: not any(p.has_model() or p.blob_file(digest).exists() for p in peers), 120,
          "the replica (and its blob) to be dropped", interval=0.25)


def metric_rows(nodes: list[Node], before: dict[str, dict[str, float]], names: dict[str, str]) -> None:
    keys = ["received peer", "received local", "received registry", "served"]
    print(f"    {'node':6s} " + " ".join(f"{k:>18s}" for k in keys) + "   sources used")
    for n in nodes:
        now = n.metrics()
        cells = " ".join(f"{(now.get(k, 0) - before[n.label].get(k, 0)) / 2**20:14.1f} MiB" for k in keys)
        used = ", ".join(sorted(names.get(s, s) for s in n.transfer_sources if s != "local")) or "-"
        print(f"    {n.label:6s} {cells}   {used}")
        n.transfer_sources.clear()


def run_cluster(args: argparse.Namespace, work: Path, net: Network, nodes: list[Node]) -> None:
    labels = ["seed", *[f"peer{i}" for i in range(1, args.peers + 1)]]
    for label, (ns, host) in zip(labels, net.build(labels), strict=True):
        nodes.append(Node(label, ns, host, work / label))
    seed, peers = nodes[0], nodes[1:]
    env = {"OMX_P2P__PROFILE": "local", "OMX_REPLICATION__FACTOR": "1", "OMX_MODELS__REGISTRY": "127.0.0.1:9",
           "OMX_MODELS__CHUNK_SIZE": str(int(args.chunk_mib * 2**20)),
           "OMX_MODELS__CONCURRENCY": str(args.concurrency), "OMX_SECURITY__ADMIN_KEYS": json.dumps([ADMIN_KEY])}
    seed.start(env, [])
    seed.wait_ready()
    secret = (seed.home / "cluster" / "secret").read_bytes().hex()
    for p in peers:
        p.start({**env, "OMX_CLUSTER_SECRET": secret}, ["--join", f"{seed.host}:4001"])
    for p in peers:
        p.wait_ready()
    ids = {n.node_id for n in nodes}
    until(lambda: all(n["status"] == "alive" for n in seed.get("/api/distributed/nodes")["nodes"]
                      if n["id"] in ids) and len(seed.get("/api/distributed/nodes")["nodes"]) >= len(ids),
          60, "every node to be alive")
    names = {n.node_id: n.label for n in nodes}
    print(f"{len(nodes)} nodes up ({', '.join(f'{n.label} {n.host}' for n in nodes)}); creating the model")
    digest = create_model(seed, work, args.size)
    net.shape(args.rate)
    ideal = args.size / (rate_bits(args.rate) / 8)
    print(f"links shaped at {args.rate} both ways; the model's blob moves in {ideal:.1f}s at that rate")

    before = {n.label: n.metrics() for n in nodes}
    one, _ = replicate(seed, peers, 2, 1, args.timeout)
    print(f"(a) 1-to-1, factor 2: {one:.1f}s  ({args.size / one / 1e6:.1f} MB/s)")
    metric_rows(nodes, before, names)
    drop_copies(seed, peers, digest)

    before = {n.label: n.metrics() for n in nodes}
    swarm, each = replicate(seed, peers, len(nodes), len(peers), args.timeout)
    print(f"(b) all {len(peers)} peers, factor {len(nodes)}: {swarm:.1f}s  (each: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(each.items())) + ")")
    done_at = time.monotonic()
    metric_rows(nodes, before, names)
    with contextlib.suppress(RuntimeError):
        until(lambda: {m["name"]: m for m in seed.get("/api/distributed/models")["models"]}[MODEL]["status"]
              == "ready", 30, "the seed to see the model ready")
    row = {m["name"]: m for m in seed.get("/api/distributed/models")["models"]}.get(MODEL, {})
    print(f"    the seed's view {time.monotonic() - done_at:.1f}s later: {row.get('replicas')} replicas, "
          f"status {row.get('status')}")
    print(f"ratio (b)/(a): {swarm / one:.2f}  (target <= 1.3; a star from the seed would be {len(peers)}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="size of the model's blob (e.g. 256MiB, 1GiB)")
    ap.add_argument("--rate", default="200mbit", help="tc tbf rate of every link, each direction")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--chunk-mib", type=float, default=8.0, help="models.chunk_size of every node, MiB")
    ap.add_argument("--concurrency", type=int, default=3, help="models.concurrency of every node")
    ap.add_argument("--subnet", default="10.213.79.0/24", help="addresses of the bench's bridge")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each phase may take")
    ap.add_argument("--keep", action="store_true", help="keep the nodes' homes (logs) and say where")
    ap.add_argument("--no-loopback", action="store_true", help="skip bench/peer_transfer.py's measurements")
    ap.add_argument("--loopback-mib", type=int, default=512, help="blob size for bench/peer_transfer.py")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of bench/peer_transfer.py")
    args = ap.parse_args()
    args.size = parse_size(args.size)
    rate_bits(args.rate)
    if os.geteuid() != 0:
        print("bench/replication.py needs root to create network namespaces (ip netns, tc); "
              "run it as root. Nothing was done.")
        return
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (Debian package iproute2; scripts/setup.sh installs it)")
    remove_leftovers()
    subnet = ipaddress.IPv4Network(args.subnet)
    if any(ipaddress.IPv4Network(r.split()[0], strict=False).overlaps(subnet)
           for r in sh("ip", "-4", "route").splitlines() if r and r.split()[0][0].isdigit()):
        raise SystemExit(f"--subnet {subnet} overlaps a route of this machine; pick another")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; blob {args.size / 2**20:.0f} MiB, "
          f"chunks {args.chunk_mib} MiB, concurrency {args.concurrency}, {args.peers} peers, rate {args.rate}")
    unwind_on_signals()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    net = Network(subnet)
    nodes: list[Node] = []
    try:
        run_cluster(args, work, net, nodes)
    except KeyboardInterrupt:
        print("interrupted")
        raise SystemExit(130) from None
    except RuntimeError as exc:
        print(f"failed: {exc}")
        for n in nodes:
            print(f"--- {n.label} log tail\n{n.log_tail()}")
        raise SystemExit(1) from exc
    finally:
        hold_signals()
        print("removing the namespaces and the nodes' homes")
        stop_nodes(nodes)
        net.close()
        if args.keep:
            print(f"the nodes' homes are kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        release_signals()
    if not args.no_loopback:
        import peer_transfer

        print(f"\nbench/peer_transfer.py --mib {args.loopback_mib} --chunk-mib {args.chunk_mib} "
              f"--repeat {args.repeat} --concurrency {args.concurrency}")
        peer_transfer.main(["--mib", str(args.loopback_mib), "--chunk-mib", str(args.chunk_mib),
                            "--repeat", str(args.repeat), "--concurrency", str(args.concurrency)])


if __name__ == "__main__":
    main()
