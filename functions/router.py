"""Model-routed calls go to the best holder: the shell around :mod:`omx.functions.routing`.

The dispatcher hands every model-routed call to :meth:`Router.serve`. It finds
the alive holders of the call's model, ranks them by expected wait, and either
runs the handler here or forwards the raw request body unchanged to the chosen
peer as a signed *hop* request (``X-Omx-Hop``), which the peer answers itself
and never forwards again. The peer's answer goes back byte for byte: a JSON
reply whole, an NDJSON or SSE stream as it arrives. Every model-routed response
names the node that ran it in ``X-Omx-Node``.

**Failover.** A peer that cannot be reached, refuses (503, 429), no longer holds
the model (404), fails (5xx) or breaks off before the first body byte is retried
on the next candidate (at most :data:`MAX_TRIES` nodes), and is avoided for a
few seconds. A JSON reply is only sent once complete, so a non-streamed request
is retried whenever its node fails. A stream that breaks after its first byte
ends with an error object in the stream's own format. A model held nowhere falls
through to the handler (Ollama's 404); one held only by members that are down
answers 503 with ``Retry-After``.

**Holding.** While every holder is at capacity (all its slots taken) and other
members are alive, a call waits in this node's :class:`~omx.functions.holding.HoldingQueue`
for a free slot anywhere instead of queueing behind one node, then 503; meanwhile
the :class:`DemandSink` may add a replica of the model on an idle node.

**Load.** The router counts the model-routed requests running here per model
(:meth:`local_load`); hop answers carry it in ``X-Omx-Load``; peers are polled
(``GET /api/peer/load``) when their report is older than half a second while
requests flow (a call waits briefly for holders nothing fresh is known of), and
every couple of seconds while needed lately."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from omx.errors import PeerError, ServiceBusy
from omx.functions.holding import HoldingQueue
from omx.functions.registry import ByteStream, HandlerSpec, Reply, is_stream
from omx.functions.relay import (
    MAX_JSON_REPLY,
    STREAM_ERRORS,
    PeerReply,
    error_text,
    json_answer,
    read_all,
    relay_lines,
    retryable,
    streamed,
)
from omx.functions.routing import (
    DEFAULT_WEIGHTS,
    LOAD_HEADER,
    Avoidance,
    Candidate,
    Holders,
    LoadBook,
    ModelLoad,
    NodeLoad,
    RouteWeights,
    expected_wait,
    has_room,
    holders_of,
    load_from_header,
    load_to_header,
    rank,
)
from omx.storage.holdings import model_key
from omx.storage.placement import ClusterSnapshot
from omx.types import NodeId

if TYPE_CHECKING:
    from omx.functions.call import Call, Services

__all__ = ["HOP_HEADER", "MAX_JSON_REPLY", "MAX_TRIES", "NODE_HEADER", "DemandSink", "PeerLink", "PeerReply",
           "RouteObserver", "Router", "read_all"]

log = logging.getLogger("omx.routing")

HOP_HEADER = "X-Omx-Hop"
NODE_HEADER = "X-Omx-Node"
MAX_TRIES = 3  # nodes tried for one request before it fails with 503
AVOID_S = 5.0  # seconds a node that failed a request is tried only after every other holder
BUSY_AVOID_S = 1.0  # the same for a node that was only busy (503, 429)
DOWN_RETRY_AFTER = 5
IDLE_POLL_S = 2.0  # how often the loads of the peers needed lately are polled while no request asks for them
FOLLOW_S = 60.0  # seconds a peer's load stays polled after it was last needed (to rank, for a demand copy, to show)
FIRST_LOAD_WAIT_S = 0.25  # at most this long a call waits for the loads of holders nothing fresh is known of


class PeerLink(Protocol):
    """What the router needs of the network (implemented by the runtime)."""

    def snapshot(self) -> ClusterSnapshot:
        """Every known member with its holdings (cheap, no I/O)."""
        ...

    async def request(self, node: NodeId, method: str, path: str, headers: Mapping[str, str], body: bytes, *,
                      head_timeout_s: float | None = None) -> PeerReply:
        """Send a signed hop request; raises :class:`~omx.errors.PeerError` when ``node`` does not answer.

        ``head_timeout_s`` bounds the wait for the response head (None: the link's default).
        """
        ...

    async def load(self, node: NodeId) -> NodeLoad:
        """``node``'s load report (``GET /api/peer/load``); raises PeerError or ValueError."""
        ...


class RouteObserver(Protocol):
    """Told where requests went (the node's metrics)."""

    def routed(self, model: str, node: str) -> None:
        ...

    def retried(self) -> None:
        ...


class DemandSink(Protocol):
    """Told when requests for a model wait for a slot on every holder (replicas that follow demand)."""

    def overflow(self, holders: Holders) -> None:
        """Must not block: it may start a copy of the model on an idle node."""
        ...


class _Failed(Exception):
    def __init__(self, node: NodeId, reason: str, avoid_s: float) -> None:
        super().__init__(reason)
        self.node = node
        self.avoid_s = avoid_s


def _raw_body(body: Any, call: Call) -> bytes:
    """The body to forward: as the client sent it, else (an in-process caller) the validated one, re-encoded."""
    if call.body_bytes or not isinstance(body, BaseModel):
        return call.body_bytes
    return body.model_dump_json(exclude_unset=True).encode()


def _room(cands: list[Candidate]) -> bool:
    """Whether a call may go out now: a holder not avoided has a free slot (or every holder is avoided)."""
    return any(not c.avoided and has_room(c.load) for c in cands) or all(c.avoided for c in cands)


class Router:
    """Runs model-routed calls here or on the best holder (see the module docstring)."""

    def __init__(self, node_id: str, link: PeerLink, services: Services, *,
                 observer: RouteObserver | None = None, clock: Callable[[], float] = time.monotonic,
                 weights: RouteWeights = DEFAULT_WEIGHTS, book: LoadBook | None = None,
                 avoidance: Avoidance | None = None, holding: HoldingQueue | None = None,
                 demand: DemandSink | None = None) -> None:
        self.node_id = NodeId(node_id)
        self.link = link
        self.services = services
        self.observer = observer
        self.clock = clock
        self.weights = weights
        self.book = book or LoadBook()
        self.avoid = avoidance or Avoidance(AVOID_S)
        self.holding = holding
        """Requests waiting for a free slot anywhere (None: none wait here, they queue on a holder)."""
        self.demand = demand
        self._busy: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self._last_header: dict[NodeId, tuple[str, NodeLoad]] = {}  # a repeated load header is parsed once
        self._tasks: set[asyncio.Task[Any]] = set()
        self.tags_cache: dict[NodeId, tuple[str, list[dict[str, Any]]]] = {}
        """Each peer's ``/api/tags`` rows with the inventory version they were fetched at."""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Keep peers' loads fresh in the background (every :data:`IDLE_POLL_S`)."""
        self._spawn(self._keep_fresh(), "route-loads")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(IDLE_POLL_S)
            self.tend()

    def tend(self) -> None:
        """Poll the followed alive peers whose load is getting old; forget what is known of members that are gone."""
        now = self.clock()
        if not self.book.known() and not self.tags_cache:
            return  # an idle router: nothing to poll or forget, so no snapshot to take
        alive = {v.node for v in self.link.snapshot().nodes if v.alive and v.node != self.node_id}
        for node in alive & set(self.book.needed_since(now - FOLLOW_S)):
            self._maybe_poll(node, now)
        for node in set(self.book.known()) - alive:
            self.book.forget(node)
        for node in set(self.tags_cache) - alive:
            del self.tags_cache[node]

    # ------------------------------------------------------------ load

    def local_load(self) -> NodeLoad:
        """This node's load: loaded models with their running and waiting requests, free memory."""
        scheduler = self.services.scheduler
        slots = scheduler.num_parallel
        models: dict[str, ModelLoad] = {}
        names = dict(self._names)
        for loaded in scheduler.loaded():
            key = model_key(loaded.name)
            names[key] = loaded.name
            busy = max(self._busy.get(key, 0), loaded.active_requests)
            models[key] = ModelLoad(True, loaded.active_requests, busy - loaded.active_requests,
                                    loaded.slots or slots)
        for key, busy in self._busy.items():
            if busy and key not in models:
                models[key] = ModelLoad(False, 0, busy, slots)
        free = None
        if self.services.cluster is not None:
            res = self.services.cluster.resources()
            free = max(0, res.memory_total - res.memory_used) if res.memory_total else None
        return NodeLoad(models, free, slots, {k: names[k] for k in models if k in names})

    def node_load(self, node: NodeId) -> NodeLoad | None:
        """A member's load as this node knows it (its own first-hand); None when nothing fresh is known (asked)."""
        if node == self.node_id:
            return self.local_load()
        self.book.needed(node, now := self.clock())
        self._maybe_poll(node, now)
        return self.book.node_load(node, now)

    def busy_models(self) -> tuple[str, ...]:
        """Keys of the models with requests running or waiting here (the replicator keeps their copies)."""
        return tuple(k for k, n in self._busy.items() if n > 0 and k)

    def _begin(self, key: str, name: str) -> None:
        self._busy[key] = self._busy.get(key, 0) + 1
        self._names.setdefault(key, name)

    def _end(self, key: str) -> None:
        left = self._busy.get(key, 0) - 1
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)
            self._names.pop(key, None)
        self._changed()

    def _changed(self) -> None:
        if self.holding is not None:
            self.holding.changed()

    def _maybe_poll(self, node: NodeId, now: float) -> None:
        if self.book.wants_refresh(node, now):
            self.book.asked(node, now)
            self._spawn(self._poll(node), f"route-load-{node}")

    async def _poll(self, node: NodeId) -> None:
        try:
            load = await self.link.load(node)
        except (PeerError, ValueError) as exc:
            log.debug("load of %s not fetched: %s", node, exc)
            return
        self.book.report(node, load, self.clock())
        self._changed()

    def _heard(self, node: NodeId, headers: Mapping[str, str]) -> None:
        value = headers.get(LOAD_HEADER.lower())
        if value:
            try:
                last = self._last_header.get(node)
                load = last[1] if last is not None and last[0] == value else load_from_header(value)
                self._last_header[node] = (value, load)
                self.book.report(node, load, self.clock())
            except ValueError as exc:
                log.debug("bad load header from %s: %s", node, exc)
            self._changed()

    def ranked(self, holders: Holders) -> tuple[NodeId, ...]:
        """``holders.alive`` best first (polling the loads that are getting old)."""
        return rank(self.candidates(holders), holders.size, self.weights)

    def candidates(self, holders: Holders) -> list[Candidate]:
        """``holders.alive`` with their estimated loads (polling the loads that are getting old)."""
        now = self.clock()
        cands = []
        for node in holders.alive:
            if node == self.node_id:
                load = self.local_load()
                cands.append(Candidate(node, load.model(holders.key), load.free_memory, local=True))
                continue
            self.book.needed(node, now)
            self._maybe_poll(node, now)
            cands.append(Candidate(node, self.book.estimate(node, holders.key, now),
                                   self.book.free_memory(node, now), avoided=self.avoid.avoided(node, now)))
        return cands

    async def _learn_loads(self, holders: Holders) -> None:
        """Poll holders nothing fresh is known of, briefly: after a quiet spell a call still goes where it is warm."""
        now = self.clock()
        unknown = [n for n in holders.alive if n != self.node_id and self.book.node_load(n, now) is None
                   and not self.avoid.avoided(n, now)]
        polls: list[asyncio.Task[None]] = []
        for node in unknown:
            self.book.needed(node, now)
            self.book.asked(node, now)
            polls.append(self._spawn(self._poll(node), f"route-load-{node}"))
        if polls:
            await asyncio.wait(polls, timeout=FIRST_LOAD_WAIT_S)

    async def order(self, holders: Holders, peers: bool) -> tuple[Holders, tuple[NodeId, ...]]:
        """Where to try a call, best first; waits in the holding queue while every holder is at capacity.

        ``peers``: whether other members are alive (a lone node queues on itself, as Ollama does).
        """
        await self._learn_loads(holders)
        holding = self.holding
        if holding is None or not holding.enabled or not peers:
            return holders, self.ranked(holders)
        cands = self.candidates(holders)
        if not holding.waiting(holders.key) and _room(cands):
            return holders, rank(cands, holders.size, self.weights)
        name, latest = holders.name, holders

        def ready() -> tuple[Holders, tuple[NodeId, ...]] | None:
            nonlocal latest
            latest = holders_of(self.link.snapshot(), name)
            found = self.candidates(latest)
            return (latest, rank(found, latest.size, self.weights)) if _room(found) else None

        def tick() -> None:
            if self.demand is not None:
                self.demand.overflow(latest)

        def retry_after() -> int:
            found = self.candidates(latest)
            waits = [expected_wait(c.load, latest.size, c.free_memory, self.weights) for c in found]
            return min(60, max(1, math.ceil(min(waits, default=1.0))))

        return await holding.wait(holders.key, ready, on_tick=tick, retry_after=retry_after)

    # ------------------------------------------------------------ serving

    async def serve(self, spec: HandlerSpec, body: Any, call: Call) -> Any:
        """Run ``spec`` for ``call`` on the best node holding its model (here when that is this node)."""
        name = getattr(body, spec.model_field, None) if spec.model_field and body is not None else None
        if call.hop or not isinstance(name, str) or not name:
            return await self.run_here(spec, body, call, name if isinstance(name, str) else "")
        snapshot = self.link.snapshot()
        holders = holders_of(snapshot, name)
        if not holders.alive:
            if holders.down:
                raise ServiceBusy(f"model '{name}' is held only by nodes that are down ({', '.join(holders.down)}); "
                                  "retry when one of them is back", retry_after=DOWN_RETRY_AFTER)
            return await self.run_here(spec, body, call, name)  # the handler answers Ollama's 404
        holders, order = await self.order(holders, any(v.alive and v.node != self.node_id for v in snapshot.nodes))
        if not order:
            raise ServiceBusy(f"every node holding model '{name}' went down while the request waited",
                              retry_after=DOWN_RETRY_AFTER)
        failures: list[str] = []
        for attempt, node in enumerate(order[:MAX_TRIES]):
            if attempt and self.observer is not None:
                self.observer.retried()
            if node == self.node_id:
                self._count(holders.name, node)
                return await self.run_here(spec, body, call, name)
            try:
                result = await self._forward(node, holders.key, spec, body, call)
            except _Failed as exc:
                call.response_headers.pop(NODE_HEADER, None)
                log.info("%s of %s on %s failed: %s", spec.name, name, node, exc)
                self.avoid.failed(node, self.clock(), exc.avoid_s)
                failures.append(str(exc))
                continue
            self._count(holders.name, node)
            return result
        raise ServiceBusy(f"no node holding model '{name}' could serve it: {'; '.join(failures)}", retry_after=1)

    def _count(self, model: str, node: str) -> None:
        if self.observer is not None:
            self.observer.routed(model, node)

    async def run_here(self, spec: HandlerSpec, body: Any, call: Call, name: str) -> Any:
        """Run the handler on this node, counted in :meth:`local_load`."""
        call.response_headers[NODE_HEADER] = self.node_id
        key = model_key(name) if name else ""
        self._begin(key, name)
        try:
            result = await spec.func(body, call)
        except BaseException:
            self._end(key)
            raise
        if is_stream(result):
            return self._tracked(result, key, call)
        if call.hop:
            call.response_headers[LOAD_HEADER] = load_to_header(self.local_load())
        self._end(key)
        return result

    async def _tracked(self, stream: AsyncIterator[Any], key: str, call: Call) -> AsyncIterator[Any]:
        """``stream``, counted until it ends; a hop answer's load header is taken once it started."""
        try:
            async for item in stream:
                if call.hop and LOAD_HEADER not in call.response_headers:
                    call.response_headers[LOAD_HEADER] = load_to_header(self.local_load())
                yield item
        finally:
            self._end(key)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    # ------------------------------------------------------------ forwarding

    async def _forward(self, node: NodeId, key: str, spec: HandlerSpec, body: Any, call: Call) -> Any:
        headers = {"Content-Type": call.headers.get("content-type", "application/json"), HOP_HEADER: "1"}
        if "accept" in call.headers:
            headers["Accept"] = call.headers["accept"]
        self.book.sent(node, key)
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.book.finished(node, key)
                self._changed()

        try:
            reply = await self.link.request(node, call.method, call.path or spec.path, headers, _raw_body(body, call))
        except PeerError as exc:
            end()
            raise _Failed(node, str(exc), AVOID_S) from exc
        relayed = False
        try:
            self._heard(node, reply.headers)
            status, media = reply.status, reply.headers.get("content-type", "application/json")
            if retryable(status):
                text = error_text(await read_all(reply, 1 << 20), status)
                raise _Failed(node, f"{node} answered {status}: {text}",
                              BUSY_AVOID_S if status in (429, 503) else AVOID_S)
            call.response_headers[NODE_HEADER] = reply.headers.get(NODE_HEADER.lower()) or node
            if status == 200 and streamed(media):
                chunks = reply.chunks()
                first = await anext(chunks, b"")
                if first.startswith(STREAM_ERRORS):  # failed before its first token: nothing reached the client
                    raise _Failed(node, f"{node} answered {first[:300].decode(errors='replace').strip()}", AVOID_S)
                relayed = True
                relay = relay_lines(node, first, chunks, reply, end, sse=media.startswith("text/event-stream"))
                return ByteStream(relay, status, {"Cache-Control": "no-cache"}, media)
            return Reply(await read_all(reply), status=status, media_type=media)
        except PeerError as exc:
            raise _Failed(node, str(exc), AVOID_S) from exc
        finally:
            if not relayed:
                end()
                await reply.aclose()

    async def peer_json(self, node: NodeId, method: str, path: str, body: bytes = b"", *,
                        within_s: float = 5.0) -> tuple[int, Any]:
        """A hop request's status and JSON answer (for the cluster-wide views); raises PeerError."""
        headers = {"Content-Type": "application/json", HOP_HEADER: "1"}
        return await json_answer(lambda: self.link.request(node, method, path, headers, body, head_timeout_s=within_s),
                                 node, path, within_s)
