"""The function table: BLAKE3-addressed sources, atomic state, last-writer-wins merge, and two
in-memory hosts exchanging tables (distribution logic without sockets; the sandbox is a double)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from omx.errors import Conflict, IntegrityError, InvalidRequest, NotFound, OmxError, StoreError
from omx.functions.custom_view import Invocation, LogLine, percentile
from omx.runtime.functions_host.host import FunctionsHost
from omx.runtime.functions_host.observe import FunctionLogs, FunctionMetrics
from omx.runtime.functions_host.peers import PeerTable, parse_records
from omx.runtime.functions_host.sandbox import Sandbox
from omx.storage.functions_store import (
    MAX_SOURCE_BYTES,
    FunctionRecord,
    FunctionStore,
    merge,
    record_from_json,
    record_to_json,
    source_version,
)

V1, V2, V3 = (blake3(x).hexdigest() for x in (b"one", b"two", b"three"))


def spec(name: str, path: str | None = None) -> dict[str, Any]:
    return {"name": name, "path": path or f"/fn/{name}", "methods": ["POST"], "timeout": 10.0,
            "memory_mb": 256, "concurrency": 4, "qualname": name}


# ------------------------------------------------------------------ records and merge


def test_deploy_rollback_and_remove_move_the_history() -> None:
    r1 = FunctionRecord.new("f", version=V1, file="a.py", spec=spec("f"), now=1.0, origin="n1")
    r2 = r1.deployed(version=V2, file="a.py", spec=spec("f"), now=2.0, origin="n2")
    r3 = r2.deployed(version=V3, file="a.py", spec=spec("f"), now=3.0, origin="n1")
    assert (r3.version, [p.version for p in r3.previous], r3.generation) == (V3, [V2, V1], 3)
    back = r3.rolled_back(now=4.0, origin="n1")
    assert (back.version, [p.version for p in back.previous], back.generation) == (V2, [V1], 4)
    assert back.rolled_back(now=5.0, origin="n1").previous == ()
    with pytest.raises(ValueError):
        r1.rolled_back(now=2.0, origin="n1")
    gone = r3.tombstone(now=6.0, origin="n3")
    assert gone.removed and gone.previous == () and gone.versions == () and gone.generation == 4
    again = gone.deployed(version=V1, file="b.py", spec=spec("f"), now=7.0, origin="n1")
    assert (again.removed, again.generation, again.previous, again.file) == (False, 5, (), "b.py")


def test_redeploying_the_same_source_keeps_the_history_without_a_duplicate() -> None:
    r1 = FunctionRecord.new("f", version=V1, file="a.py", spec=spec("f"), now=1.0, origin="n1")
    r2 = r1.deployed(version=V2, file="a.py", spec=spec("f"), now=2.0, origin="n1")
    r3 = r2.deployed(version=V1, file="a.py", spec=spec("f"), now=3.0, origin="n1")
    assert (r3.version, [p.version for p in r3.previous]) == (V1, [V2])


def test_merge_is_last_writer_wins_whatever_the_order() -> None:
    base = FunctionRecord.new("f", version=V1, file="a.py", spec=spec("f"), now=1.0, origin="n1")
    newer = base.deployed(version=V2, file="a.py", spec=spec("f"), now=2.0, origin="n2")
    rival = base.deployed(version=V3, file="a.py", spec=spec("f"), now=2.0, origin="n3")  # same generation
    removed = newer.tombstone(now=3.0, origin="n1")
    other = FunctionRecord.new("g", version=V1, file="b.py", spec=spec("g"), now=1.0, origin="n2")
    records = [base, newer, rival, removed, other]
    results = set()
    for order in itertools.permutations(records):
        table: dict[str, FunctionRecord] = {}
        for record in order:
            table = merge(table, [record])
        results.add(json.dumps([record_to_json(table[k]) for k in sorted(table)]))
        assert merge(table, order) == table  # idempotent
    assert len(results) == 1
    final = json.loads(results.pop())
    assert final[0]["removed"] and final[0]["generation"] == 3 and final[1]["name"] == "g"
    assert merge({}, [newer, rival])["f"].version == V3  # same generation and time: the greater node id


def test_records_round_trip_and_bad_ones_are_refused() -> None:
    r = FunctionRecord.new("f", version=V1, file="a.py", spec=spec("f"), now=1.5, origin="n1") \
        .deployed(version=V2, file="a.py", spec=spec("f"), now=2.0, origin="n1")
    assert record_from_json(json.loads(json.dumps(record_to_json(r)))) == r
    good = record_to_json(r)
    for key, value in [("version", "abc"), ("name", "Bad Name"), ("generation", 0), ("generation", True),
                       ("spec", {"nopath": 1}), ("removed", "yes"), ("previous", "x"), ("deployed_at", "1")]:
        with pytest.raises(ValueError):
            record_from_json({**good, key: value})
    assert parse_records({"functions": [good, {**good, "version": "zz"}, 7]}) == [r]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    samples = [float(i) for i in range(1, 101)]
    assert (percentile(samples, 0.5), percentile(samples, 0.99), percentile([3.0], 0.99)) == (50.0, 99.0, 3.0)


# ------------------------------------------------------------------ the store on disk


def test_sources_are_stored_by_blake3_and_verified(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path / "functions")
    version = store.put_source(b"print(1)\n")
    assert version == source_version(b"print(1)\n") == blake3(b"print(1)\n").hexdigest()
    assert store.read_source(version) == b"print(1)\n"
    with pytest.raises(IntegrityError):
        store.put_source(b"print(2)\n", expected=version)
    with pytest.raises(StoreError) as too_big:
        store.put_source(b"#" * (MAX_SOURCE_BYTES + 1))
    assert too_big.value.status == 413
    store.blob_path(version).write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        store.read_source(version)


def test_the_table_survives_a_reload_and_a_damaged_file_is_an_error(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path / "functions")
    keep = store.put_source(b"a")
    drop = store.put_source(b"b")
    r = FunctionRecord.new("f", version=keep, file="a.py", spec=spec("f"), now=1.0, origin="n1")
    table = {"f": r, "g": FunctionRecord.new("g", version=drop, file="b.py", spec=spec("g"), now=1.0,
                                             origin="n1").tombstone(now=2.0, origin="n1")}
    store.save(table)
    assert FunctionStore(tmp_path / "functions").load() == table
    assert not list((tmp_path / "functions").glob(".*.tmp"))
    store.prune(table)
    assert store.has_source(keep) and not store.has_source(drop)
    store.state_path.write_text("{not json")
    with pytest.raises(StoreError):
        store.load()


# ------------------------------------------------------------------ two hosts in memory


class FakeResult:
    def __init__(self, value: Any = None, stream: AsyncIterator[Any] | None = None) -> None:
        self.value, self.stream = value, stream


class FakePool:
    def __init__(self, version: str, gate: asyncio.Event | None) -> None:
        self.version, self.gate, self.closed = version, gate, False

    async def call(self, body: Any, headers: Mapping[str, str]) -> Invocation:
        assert not self.closed, "a call reached a closed pool"
        if self.gate is not None:
            await self.gate.wait()
        return Invocation(value={"version": self.version, "body": body})

    async def aclose(self) -> None:
        self.closed = True


class FakeSandbox(Sandbox):
    """Lines ``name path`` declare functions; ``boom`` is a syntax error on its line."""

    def __init__(self, problem: str | None = None) -> None:
        super().__init__(None)
        self._problem, self._checked = problem, True
        self.gate: asyncio.Event | None = None
        self.pools: list[FakePool] = []

    async def check(self) -> str | None:
        return self._problem

    async def inspect(self, filename: str, source: str) -> list[dict[str, Any]]:
        out = []
        for number, line in enumerate(source.splitlines(), 1):
            if line == "boom":
                raise InvalidRequest(f"{filename}, line {number}: invalid syntax")
            name, _, path = line.partition(" ")
            out.append(spec(name, path or None))
        return out

    def pool(self, filename: str, source: str, spec: Mapping[str, Any]) -> Any:
        self.pools.append(FakePool(source_version(source.encode()), self.gate))
        return self.pools[-1]

    async def call(self, pool: Any, body: Any, headers: Mapping[str, str]) -> Invocation:
        result: Invocation = await pool.call(body, headers)
        return result


class Net:
    """Hosts that reach each other directly (what PeerFunctions does over signed HTTP)."""

    def __init__(self) -> None:
        self.hosts: dict[str, FunctionsHost] = {}
        self.down: set[str] = set()
        self.pulls: list[tuple[str, str]] = []
        """(puller, pulled) of every table pulled."""
        self.gossip = True
        """Whether hosts see each other's table digests (the ``fn`` Serf tag)."""

    def peers_of(self, me: str) -> Any:
        net = self

        class Peers:
            def alive_peers(self) -> list[str]:
                return [n for n in net.hosts if n != me and n not in net.down]

            def version_of(self, node: str) -> str | None:
                return net.hosts[node].table_version() if net.gossip else None

            async def table(self, node: str) -> PeerTable:
                net.pulls.append((me, node))
                doc = net.hosts[node].peer_table()
                return PeerTable(node, tuple(parse_records(doc)), doc["serving"], {}, doc["table_version"])

            async def announce(self, node: str, doc: dict[str, Any]) -> None:
                net.hosts[node].peer_announce(me, json.loads(json.dumps(doc)))

            async def source(self, node: str, version: str) -> bytes:
                return await net.hosts[node].peer_source(version)

            async def logs(self, node: str, name: str, after: int) -> list[LogLine]:
                return net.hosts[node].peer_logs(name, after)

        return Peers()

    def add(self, node: str, root: Path, sandbox: FakeSandbox | None = None) -> FunctionsHost:
        host = FunctionsHost(node, FunctionStore(root / node), sandbox or FakeSandbox(),
                             peers=self.peers_of(node), metrics=FunctionMetrics(None), logs=FunctionLogs(node),
                             reserved=lambda name, path: "built-in" if name == "generate" else None)
        self.hosts[node] = host
        return host


async def settle(*hosts: FunctionsHost) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
        for host in hosts:
            await host._refresh()  # noqa: SLF001 - one pull round, as the loop would run it
            absorbing = [t for t in host._tasks if t.get_name().startswith("functions-absorb")]  # noqa: SLF001
            await asyncio.gather(*absorbing)  # announcements being taken in


async def test_a_deploy_spreads_a_removal_sticks_and_a_late_node_catches_up(tmp_path: Path) -> None:
    net = Net()
    a, b = net.add("a", tmp_path), net.add("b", tmp_path)
    done = await a.deploy("shout.py", b"shout\nwhisper /fn/quiet\n")
    assert [(d.name, d.path) for d in done] == [("shout", "/fn/shout"), ("whisper", "/fn/quiet")]
    await settle(a, b)
    answer = await b.invoke("/fn/quiet", "POST", {"x": 1}, {})
    assert answer.value == {"version": done[0].version, "body": {"x": 1}}
    rows = {f.name: f for f in await a.listing()}
    assert rows["shout"].nodes == ("a", "b")
    await b.remove("whisper")
    net.down.add("b")
    c = net.add("c", tmp_path)  # joins while b is away, sees only a
    await settle(a, c)
    net.down.discard("b")
    await settle(a, b, c)
    for host in (a, b, c):
        assert host.known("shout") and not host.known("whisper")
        with pytest.raises(NotFound):
            await host.invoke("/fn/quiet", "POST", {}, {})
    restarted = net.add("c", tmp_path)
    await restarted.start()
    try:
        assert (await restarted.invoke("/fn/shout", "POST", {}, {})).value["version"] == done[0].version
    finally:
        await restarted.aclose()
        for host in (a, b):
            await host.aclose()


async def test_a_pull_round_skips_the_tables_whose_digest_shows_nothing_new(tmp_path: Path) -> None:
    net = Net()
    a, b, c = net.add("a", tmp_path), net.add("b", tmp_path), net.add("c", tmp_path)
    await settle(a, b, c)
    assert a.table_version() == b.table_version() == c.table_version()
    net.pulls.clear()
    await settle(a, b, c)
    assert net.pulls == []  # a quiet cluster pulls nothing
    net.down.add("c")
    await a.deploy("shout.py", b"shout\n")  # c misses the announcement
    assert a.table_version() != c.table_version()
    net.down.discard("c")
    net.pulls.clear()
    await settle(c)
    assert c.known("shout") and c.table_version() == a.table_version()
    assert set(net.pulls) <= {("c", "a"), ("c", "b")}
    net.pulls.clear()
    await settle(a, b, c)
    assert net.pulls == []
    net.gossip = False  # peers publishing no digest are pulled once, then left to announcements
    await settle(a, b, c)
    assert len(net.pulls) == len(set(net.pulls))
    net.pulls.clear()
    await settle(a, b, c)
    assert net.pulls == []
    rows = {f.name: f for f in await a.listing()}  # a listing pulls everyone (what each serves, its figures)
    assert rows["shout"].nodes == ("a", "b", "c") and {("a", "b"), ("a", "c")} <= set(net.pulls)
    for host in (a, b, c):
        await host.aclose()


async def test_redeploy_swaps_without_failing_a_call_in_flight_and_rollback_returns(tmp_path: Path) -> None:
    net = Net()
    sandbox = FakeSandbox()
    a = net.add("a", tmp_path, sandbox)
    v1 = (await a.deploy("f.py", b"f\n"))[0].version
    sandbox.gate = asyncio.Event()
    a.serving.by_name["f"].pool.gate = sandbox.gate  # type: ignore[attr-defined]
    slow = asyncio.create_task(a.invoke("/fn/f", "POST", {}, {}))
    await asyncio.sleep(0)
    v2 = (await a.deploy("f.py", b"f\n\n"))[0].version
    old = sandbox.pools[0]
    assert not old.closed  # still running a call
    sandbox.gate.set()
    assert (await slow).value["version"] == v1
    await asyncio.sleep(0.01)
    assert old.closed
    assert (await a.invoke("/fn/f", "POST", {}, {})).value["version"] == v2
    back = await a.rollback("f")
    assert back.version == v1 and (await a.invoke("/fn/f", "POST", {}, {})).value["version"] == v1
    with pytest.raises(Conflict):
        await a.rollback("f")
    await a.aclose()


async def test_conflicts_errors_and_a_node_without_sandbox(tmp_path: Path) -> None:
    net = Net()
    a = net.add("a", tmp_path)
    await a.deploy("one.py", b"f\n")
    with pytest.raises(Conflict):
        await a.deploy("two.py", b"f\n")  # name owned by one.py
    with pytest.raises(Conflict):
        await a.deploy("two.py", b"g /fn/f\n")  # path owned by one.py
    with pytest.raises(Conflict):
        await a.deploy("two.py", b"generate\n")  # a built-in's name
    with pytest.raises(InvalidRequest):
        await a.deploy("two.py", b"g\nboom\n")
    assert not a.known("g")
    await a.deploy("one.py", b"h\n")  # the file now defines h only: f goes
    assert a.known("h") and not a.known("f")
    with pytest.raises(OmxError) as wrong:
        await a.invoke("/fn/h", "GET", {}, {})
    assert wrong.value.status == 405
    off = net.add("off", tmp_path, FakeSandbox(problem="bubblewrap is not installed"))
    with pytest.raises(OmxError) as refused:
        await off.deploy("x.py", b"x\n")
    assert refused.value.status == 503 and "bubblewrap" in refused.value.message
    await settle(a, off)
    assert off.known("h") and "h" not in off.serving.by_name
    await a.aclose()


async def test_a_table_that_cannot_be_read_disables_functions_and_is_never_overwritten(tmp_path: Path) -> None:
    net = Net()
    a = net.add("a", tmp_path)
    a.store.state_path.parent.mkdir(parents=True)
    a.store.state_path.write_text("{damaged")
    await a.start()
    with pytest.raises(OmxError) as refused:
        await a.deploy("f.py", b"f\n")
    assert refused.value.status == 503 and "unreadable" in refused.value.message
    b = net.add("b", tmp_path)
    await b.deploy("g.py", b"g\n")  # its announcement is ignored by a
    await asyncio.sleep(0.01)
    assert a.store.state_path.read_text() == "{damaged"
    await a.aclose()
    await b.aclose()


async def test_a_node_that_never_served_the_older_version_can_still_roll_back(tmp_path: Path) -> None:
    net = Net()
    a = net.add("a", tmp_path)
    v1 = (await a.deploy("f.py", b"f\n"))[0].version
    await a.deploy("f.py", b"f\n\n")
    b = net.add("b", tmp_path)  # joins after both deploys
    await settle(a, b)
    assert b.store.has_source(v1)
    assert (await b.rollback("f")).version == v1
    await settle(a, b)
    assert (await a.invoke("/fn/f", "POST", {}, {})).value["version"] == v1
    await a.aclose()
    await b.aclose()
