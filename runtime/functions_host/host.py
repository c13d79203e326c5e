"""The node's function host: the table, the pools, the distribution (implements ``CustomFunctions``).

**Table.** The function table (:mod:`omx.storage.functions_store`) is loaded at
start and saved after every change; sources are BLAKE3-addressed blobs. A
deploy validates the file in a sandboxed worker first, so nothing of a file
that does not import is stored.

**Distribution.** A change (deploy, rollback, remove) bumps the record's
generation and is announced to every alive peer at once (signed POST of the
whole table). Every :data:`PULL_S` seconds, and whenever membership changes,
each node also pulls every alive peer's table: a node that missed an
announcement, joined later or restarted catches up, and tombstones make a
removal stick; each node gossips a short digest of its table (the ``fn`` Serf
tag), and a pull skips a peer whose digest matches the table last pulled from it,
so a quiet cluster pulls nothing. Tables merge last-writer-wins per function. A node serves a
version once it holds its source: fetched from a peer that has it, verified
against its BLAKE3 name before it is stored.

**Serving.** :meth:`apply` makes the served pools match the table: one pool
per (function, version), swapped atomically (see :mod:`.serving`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from omx.errors import Conflict, InvalidRequest, NotFound, OmxError, PeerError, StoreError
from omx.functions.custom_view import Deployed, FunctionFacts, Invocation, LogLine, percentile
from omx.runtime.functions_host.observe import FunctionLogs, FunctionMetrics
from omx.runtime.functions_host.peers import PeerFunctions, PeerTable, parse_records
from omx.runtime.functions_host.sandbox import Sandbox
from omx.runtime.functions_host.serving import Served, Serving
from omx.storage.functions_store import FunctionRecord, FunctionStore, merge, record_to_json

__all__ = ["PULL_S", "FunctionsHost"]

log = logging.getLogger("omx.functions")

PULL_S = 10.0
"""Seconds between two pulls of the peers' tables (an announcement or a membership change pulls at once)."""
LOG_POLL_S = 0.5


class FunctionsHost:
    """See the module docstring. ``reserved`` tells whether a path or name belongs to a built-in."""

    def __init__(self, node_id: str, store: FunctionStore, sandbox: Sandbox, *,
                 peers: PeerFunctions | None, metrics: FunctionMetrics, logs: FunctionLogs,
                 reserved: Callable[[str, str], str | None],
                 publish: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._node_id = node_id
        self._publish = publish
        """Gossips the table's digest (:meth:`table_version`) after it changed."""
        self._published: str | None = None
        self.store = store
        self.sandbox = sandbox
        self.peers = peers
        self.metrics = metrics
        self.log_lines = logs
        self._reserved = reserved
        self.table: dict[str, FunctionRecord] = {}
        self.serving = Serving()
        self.peer_tables: dict[str, PeerTable] = {}
        self._lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: set[str] = set()
        self._broken: str | None = None
        """Why the saved table could not be read (then nothing is served or changed here)."""
        """Versions the table needs whose sources are not here yet."""

    @property
    def node_id(self) -> str:
        return self._node_id

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the table, serve what it holds, start the distribution loop."""
        problem = await self.sandbox.check()
        if problem is not None:
            log.warning("custom functions are disabled on this node: %s", problem)
        try:
            self.table = await asyncio.to_thread(self.store.load)
        except StoreError as exc:  # never overwrite a table this node cannot read: refuse, say why
            self._broken = f"{exc} (move it away to start with an empty table)"
            log.error("custom functions are disabled on this node: %s", self._broken)
            return
        await asyncio.to_thread(self.store.prune, self.table)
        await self.apply()
        self._spawn(self._pull_loop(), "functions-pull")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.serving.aclose()

    def kick(self) -> None:
        """Pull the peers' tables soon (membership changed)."""
        self._kick.set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ table changes

    def _current(self, name: str) -> FunctionRecord:
        record = self.table.get(name)
        if record is None or record.removed:
            raise NotFound(f"function '{name}' not found")
        return record

    def _require(self) -> None:
        if self._broken is not None:
            raise OmxError(f"custom functions are disabled on this node: {self._broken}", status=503)
        self.sandbox.require()

    def known(self, name: str) -> bool:
        record = self.table.get(name)
        return record is not None and not record.removed

    def _check_owner(self, name: str, path: str, file: str) -> None:
        """409 when a built-in or a function of another file owns ``name`` or ``path``."""
        owner = self._reserved(name, path)
        if owner is not None:
            raise Conflict(owner)
        for other in self.table.values():
            if other.removed or other.file == file:
                continue
            if other.name == name:
                raise Conflict(f"function '{name}' belongs to file '{other.file}'; remove it first "
                               f"(omx fn rm {name}) or choose another name")
            if other.path == path:
                raise Conflict(f"path {path} is served by function '{other.name}' of file '{other.file}'")

    async def deploy(self, filename: str, source: bytes) -> list[Deployed]:
        self._require()
        try:
            text = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"the source is not UTF-8 text (byte {exc.start})") from exc
        specs = await self.sandbox.inspect(filename, text)
        seen: dict[str, str] = {}
        for spec in specs:
            if spec["path"] in seen:
                raise InvalidRequest(f"functions '{seen[spec['path']]}' and '{spec['name']}' of {filename} "
                                     f"share the path {spec['path']}")
            seen[spec["path"]] = spec["name"]
        async with self._lock:
            for spec in specs:
                self._check_owner(spec["name"], spec["path"], filename)
            version = await asyncio.to_thread(self.store.put_source, source)
            now, names = time.time(), {spec["name"] for spec in specs}
            changes = []
            for spec in specs:
                old = self.table.get(spec["name"])
                changes.append(old.deployed(version=version, file=filename, spec=spec, now=now, origin=self.node_id)
                               if old is not None else
                               FunctionRecord.new(spec["name"], version=version, file=filename, spec=spec, now=now,
                                                  origin=self.node_id))
            for record in self.table.values():  # functions the file no longer defines go with it
                if record.file == filename and not record.removed and record.name not in names:
                    changes.append(record.tombstone(now=now, origin=self.node_id))
            await self._commit(changes)
        await self.apply()
        return [Deployed(spec["name"], version, spec["path"]) for spec in specs]

    async def rollback(self, name: str) -> Deployed:
        self._require()
        async with self._lock:
            record = self._current(name)
            if not record.previous:
                raise Conflict(f"function '{name}' has no previous version to roll back to")
            back = record.rolled_back(now=time.time(), origin=self.node_id)
            self._check_owner(back.name, back.path, back.file)
            await self._commit([back])
        await self.apply()
        return Deployed(back.name, back.version, back.path)

    async def remove(self, name: str) -> None:
        if self._broken is not None:
            self._require()
        async with self._lock:
            record = self._current(name)
            await self._commit([record.tombstone(now=time.time(), origin=self.node_id)])
        await self.apply()

    async def _commit(self, changes: Iterable[FunctionRecord]) -> None:
        """Save ``changes`` (under ``_lock``) and announce the table to every alive peer."""
        table = merge(self.table, changes)
        await asyncio.to_thread(self.store.save, table)
        self.table = table
        self._announce()
        self._kick.set()  # gossips the new digest

    def _table_doc(self) -> dict[str, Any]:
        return {"functions": [record_to_json(r) for r in self.table.values()]}

    def table_version(self) -> str:
        """A short digest of the table (the same on every node holding the same records)."""
        rows = sorted((record_to_json(r) for r in self.table.values()), key=lambda row: str(row.get("name")))
        return hashlib.blake2b(json.dumps(rows, sort_keys=True).encode(), digest_size=6).hexdigest()

    def _announce(self) -> None:
        if self.peers is None:
            return
        doc = self._table_doc()
        for node in self.peers.alive_peers():
            self._spawn(self._announce_to(node, doc), f"functions-announce-{node}")

    async def _announce_to(self, node: str, doc: dict[str, Any]) -> None:
        assert self.peers is not None
        try:
            await self.peers.announce(node, doc)
        except (PeerError, OSError) as exc:
            log.info("function table not announced to %s: %s", node, exc)

    async def absorb(self, records: Iterable[FunctionRecord], origin: str | None = None) -> None:
        """Merge a peer's records; serve what changed (sources fetched from ``origin`` first)."""
        records = list(records)
        async with self._lock:
            table = merge(self.table, records)
            if table != self.table:
                await asyncio.to_thread(self.store.save, table)
                self.table = table
                self._kick.set()
        await self.apply(prefer=origin)

    # ------------------------------------------------------------ serving

    def version_of(self, name: str) -> str:
        served = self.serving.by_name.get(name)
        return served.version if served is not None else ""

    async def apply(self, prefer: str | None = None) -> None:
        """Make the served pools match the table (fetching missing sources from peers)."""
        async with self._apply_lock:
            problem = self.sandbox.problem()
            for name in list(self.serving.by_name):
                record = self.table.get(name)
                if record is None or record.removed or problem is not None:
                    self.serving.drop(name)
                    self.metrics.changed("retire")
                    if record is None or record.removed:
                        self.log_lines.forget(name)
                        self.metrics.forget(name)
            if problem is not None:
                return
            pending: set[str] = set()
            current = [r for r in self.table.values() if not r.removed]
            for record in current:
                if not await self._have(record.version, prefer):
                    pending.add(record.version)
                    continue
                served = self.serving.by_name.get(record.name)
                if served is not None and served.version == record.version and served.spec == record.spec:
                    continue
                try:
                    self.serving.put(await self._serve(record))
                    self.metrics.changed("serve")
                except (OmxError, OSError, ValueError) as exc:  # a bad spec or source: the others still serve
                    log.error("function %s %s not served: %s", record.name, record.version[:12], exc)
            for record in current:  # older versions too, once the current ones serve: any node can roll back
                for past in record.previous:
                    if not await self._have(past.version, prefer):
                        pending.add(past.version)
            self._pending = pending

    async def _have(self, version: str, prefer: str | None) -> bool:
        """True when the source of ``version`` is here, fetched from a peer if need be."""
        return await asyncio.to_thread(self.store.has_source, version) or await self._fetch(version, prefer)

    async def _serve(self, record: FunctionRecord) -> Served:
        source = await asyncio.to_thread(self.store.read_source, record.version)
        pool = self.sandbox.pool(record.file, source.decode("utf-8"), record.spec)
        methods = tuple(str(m).upper() for m in record.spec.get("methods", ("POST",)))
        return Served(record.name, record.version, record.path, methods, dict(record.spec), pool)

    async def _fetch(self, version: str, prefer: str | None) -> bool:
        """Fetch a source from a peer that has it (``prefer`` first); True once it is stored, verified."""
        if self.peers is None:
            return False
        peers = self.peers.alive_peers()
        for node in sorted(peers, key=lambda n: n != prefer):
            try:
                data = await self.peers.source(node, version)
                await asyncio.to_thread(self.store.put_source, data, version)
                return True
            except (PeerError, StoreError, OSError) as exc:
                log.info("source %s not fetched from %s: %s", version[:12], node, exc)
        return False

    async def invoke(self, path: str, method: str, body: Any, headers: Mapping[str, str]) -> Invocation:
        self._require()
        served = self.serving.lookup(path)
        if served is None:
            raise NotFound(f"no function serves {path}")
        if method.upper() not in served.methods:
            raise OmxError(f"method {method} not allowed on {path} (it takes {', '.join(served.methods)})",
                           status=405)
        self.serving.begin(served)
        started = time.perf_counter()
        try:
            result = await self.sandbox.call(served.pool, body, headers)
        except OmxError as exc:
            self._done(served, exc.status, started)
            raise
        except BaseException:
            self._done(served, 499, started)
            raise
        if result.stream is None:
            self._done(served, 200, started)
            return result
        return Invocation(stream=self._streamed(served, result.stream, started))

    async def _streamed(self, served: Served, stream: AsyncIterator[Any], started: float) -> AsyncIterator[Any]:
        status = 200
        try:
            async for item in stream:
                yield item
        except OmxError as exc:
            status = exc.status
            raise
        except BaseException:
            status = 499
            raise
        finally:
            self._done(served, status, started)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _done(self, served: Served, status: int, started: float) -> None:
        self.serving.end(served)
        self.metrics.call_done(served.name, status, time.perf_counter() - started)

    # ------------------------------------------------------------ views

    async def _refresh(self, everyone: bool = False) -> None:
        """Pull the alive peers' tables now (bounded: a peer that does not answer is left out).

        Only the tables that may hold news (by the peer's gossiped digest: see :meth:`_changed_since_pulled`),
        unless ``everyone`` or sources are missing here.
        """
        if self.peers is None:
            return
        alive = self.peers.alive_peers()
        for gone in set(self.peer_tables) - set(alive):
            del self.peer_tables[gone]
        if not everyone and not self._pending:
            mine = self.table_version()
            alive = [n for n in alive if self._changed_since_pulled(n, mine)]
        results = await asyncio.gather(*(self.peers.table(n) for n in alive), return_exceptions=True)
        merged: list[tuple[str, list[FunctionRecord]]] = []
        for node, result in zip(alive, results, strict=True):
            if isinstance(result, PeerTable):
                self.peer_tables[node] = result
                merged.append((node, list(result.records)))
            elif isinstance(result, BaseException) and not isinstance(result, PeerError | OSError):
                log.warning("function table of %s not read: %r", node, result)
        for node, records in merged:
            if merge(self.table, records) != self.table or self._pending:
                await self.absorb(records, node)

    def _changed_since_pulled(self, node: str, mine: str) -> bool:
        """Whether ``node``'s table may hold news: its digest is unknown, or differs from ours and from its last."""
        assert self.peers is not None
        pulled = self.peer_tables.get(node)
        gossiped = self.peers.version_of(node)
        if gossiped is None:
            return pulled is None
        return gossiped != mine and (pulled is None or gossiped != pulled.version)

    async def _pull_loop(self) -> None:
        while True:
            self._kick.clear()
            try:
                version = self.table_version()
                if self._publish is not None and version != self._published:
                    await self._publish(version)
                    self._published = version
                await self._refresh()
            except Exception:  # noqa: BLE001 - the next round retries
                log.exception("function table pull failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), PULL_S)

    async def listing(self) -> list[FunctionFacts]:
        await self._refresh(everyone=True)
        out = []
        for record in sorted(self.table.values(), key=lambda r: r.name):
            if record.removed:
                continue
            nodes, calls, errors, samples = [], 0, 0, []
            served = self.serving.by_name.get(record.name)
            if served is not None and served.version == record.version:
                nodes.append(self.node_id)
            mine = self.metrics.figures.get(record.name)
            if mine is not None:
                calls, errors, samples = mine.calls, mine.errors, list(mine.latencies)
            for node, table in sorted(self.peer_tables.items()):
                if table.serving.get(record.name) == record.version:
                    nodes.append(node)
                fig = table.figures.get(record.name)
                if fig is not None:
                    calls += fig["calls"]
                    errors += fig["errors"]
                    samples.extend(fig["latencies"])
            p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
            out.append(FunctionFacts(
                record.name, record.version, record.path, tuple(str(m) for m in record.spec.get("methods", ())),
                tuple(nodes), calls, errors, None if p50 is None else p50 * 1000,
                None if p99 is None else p99 * 1000, record.deployed_at,
                tuple(p.version for p in record.previous), record.file))
        return out

    async def logs(self, name: str, *, follow: bool) -> AsyncIterator[LogLine]:
        last: dict[str, int] = {}
        first = True
        while True:
            lines = self.log_lines.after(name, last.get(self.node_id, 0))
            if self.peers is not None:
                alive = self.peers.alive_peers()
                got = await asyncio.gather(*(self.peers.logs(n, name, last.get(n, 0)) for n in alive),
                                           return_exceptions=True)
                for result in got:
                    if isinstance(result, list):
                        lines.extend(result)
            for line in lines:
                last[line.node] = max(last.get(line.node, 0), line.seq)
            for line in sorted(lines, key=lambda ln: (ln.time, ln.node, ln.seq)):
                yield line
            if not follow:
                return
            if not first and not self.known(name):
                return
            first = False
            await self.log_lines.wait(LOG_POLL_S)

    # ------------------------------------------------------------ peer endpoints

    def peer_table(self) -> dict[str, Any]:
        return {"node": self.node_id, **self._table_doc(), "table_version": self.table_version(),
                "serving": {name: s.version for name, s in self.serving.by_name.items()},
                "figures": {name: f.to_json() for name, f in self.metrics.figures.items()}}

    def peer_announce(self, origin: str, doc: Any) -> None:
        if self._broken is not None:
            return
        self._spawn(self.absorb(parse_records(doc), origin), f"functions-absorb-{origin}")

    async def peer_source(self, version: str) -> bytes:
        try:
            return await asyncio.to_thread(self.store.read_source, version)
        except (FileNotFoundError, ValueError) as exc:
            raise NotFound(f"no function source {version[:64]}") from exc

    def peer_logs(self, name: str, after: int) -> list[LogLine]:
        return self.log_lines.after(name, after)
