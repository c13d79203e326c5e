"""The router's shell with in-memory peers: where a call runs, forwarding, failover, relaying, load accounting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import BaseModel

from omx.errors import PeerError, ServiceBusy, Unauthorized
from omx.functions.call import Call, NodeInfo, Services
from omx.functions.cluster_models import cluster_ps, remote_tags, show_elsewhere
from omx.functions.dispatch import Dispatcher, peer_verifier
from omx.functions.registry import ByteStream, HandlerSpec, Reply
from omx.functions.router import HOP_HEADER, NODE_HEADER, Router
from omx.functions.routing import LOAD_HEADER, ModelLoad, NodeLoad, load_from_header, load_to_header
from omx.mesh import Verifier, sign
from omx.mesh.peer_auth import body_digest
from omx.protocols import LoadedModel
from omx.storage.placement import ClusterSnapshot
from omx.types import BlobDigest, NodeId
from tests.support.placement import cluster, holdings, model

A, B, C, D = (NodeId(n) for n in ("omx-a", "omx-b", "omx-c", "omx-d"))
KEY = "tiny:latest"


@dataclass
class FakeReply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    pieces: list[bytes] = field(default_factory=lambda: [b'{"ok": true}'])
    breaks: bool = False
    closed: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece
        if self.breaks:
            raise PeerError("connection reset")

    async def aclose(self) -> None:
        self.closed = True


Answer = FakeReply | Exception | Callable[[], FakeReply]


@dataclass
class FakeLink:
    snap: ClusterSnapshot
    answers: dict[NodeId, list[Answer]] = field(default_factory=dict)
    sent: list[tuple[NodeId, str, str, dict[str, str], bytes]] = field(default_factory=list)
    loads: dict[NodeId, NodeLoad] = field(default_factory=dict)

    def snapshot(self) -> ClusterSnapshot:
        return self.snap

    async def request(self, node: NodeId, method: str, path: str, headers: Mapping[str, str], body: bytes, *,
                      head_timeout_s: float | None = None) -> FakeReply:
        self.sent.append((node, method, path, dict(headers), body))
        queue = self.answers.get(node) or [PeerError(f"{node} refused the connection")]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer

    async def load(self, node: NodeId) -> NodeLoad:
        if node not in self.loads:
            raise PeerError("no load")
        return self.loads[node]


class FakeScheduler:
    num_parallel = 1

    def __init__(self) -> None:
        self.rows: list[LoadedModel] = []

    def loaded(self) -> list[LoadedModel]:
        return self.rows


class Observer:
    def __init__(self) -> None:
        self.routed_calls: list[tuple[str, str]] = []
        self.retries = 0

    def routed(self, model: str, node: str) -> None:
        self.routed_calls.append((model, node))

    def retried(self) -> None:
        self.retries += 1


def make(holders: dict[NodeId, bool], *, dead: tuple[NodeId, ...] = (), local: NodeId = A,
         clock: list[float] | None = None) -> tuple[Router, FakeLink, Observer, FakeScheduler]:
    """A router on ``local`` in a cluster where ``holders[n]`` says whether n holds ``tiny``."""
    snap = cluster({n: holdings(model("tiny")) if held else holdings() for n, held in holders.items()}, dead=dead)
    link = FakeLink(snap)
    scheduler = FakeScheduler()
    services = Services(store=cast(Any, None), scheduler=cast(Any, scheduler), node=NodeInfo(local, "0"))
    observer = Observer()
    now = clock if clock is not None else [100.0]
    router = Router(local, link, services, observer=observer, clock=lambda: now[0])
    return router, link, observer, scheduler


async def _local_json(_body: Any, _call: Call) -> dict[str, Any]:
    return {"ran": "here"}


def spec(func: Any = _local_json, response: str = "json") -> HandlerSpec:
    return HandlerSpec(name="generate", path="/api/generate", methods=("POST",), func=func, model_field="model",
                       model_routed=True, hop=True, response=cast(Any, response))


def call(router: Router, *, hop: bool = False, body: bytes = b'{"model":"tiny","prompt":"hi"}') -> Call:
    c = Call(services=router.services, spec=spec(), path="/api/generate?x=1", body_bytes=body,
             headers={"content-type": "application/json"})
    c.hop = hop
    return c


def body(name: str = "tiny") -> Any:
    return SimpleNamespace(model=name)


async def collect(stream: ByteStream) -> bytes:
    return b"".join([piece async for piece in stream.chunks])


# ------------------------------------------------------------------ where it runs


async def test_a_model_held_nowhere_runs_here_for_the_handlers_404() -> None:
    router, link, obs, _ = make({A: False, B: False})
    c = call(router)
    assert await router.serve(spec(), body("other"), c) == {"ran": "here"}
    assert c.response_headers[NODE_HEADER] == A and not link.sent and obs.routed_calls == []


async def test_a_call_without_a_model_name_runs_here() -> None:
    router, link, _, _ = make({A: False, B: True})
    assert await router.serve(spec(), body(""), call(router)) == {"ran": "here"}
    assert await router.serve(spec(), None, call(router)) == {"ran": "here"}
    assert not link.sent


async def test_an_idle_local_holder_wins_over_an_idle_peer() -> None:
    router, link, obs, _ = make({A: True, B: True})
    c = call(router)
    assert await router.serve(spec(), body(), c) == {"ran": "here"}
    assert not link.sent and obs.routed_calls == [(KEY, A)] and c.response_headers[NODE_HEADER] == A


async def test_a_lone_call_after_a_quiet_spell_waits_for_the_holders_loads_and_goes_where_the_model_is_loaded() -> None:
    router, link, obs, _ = make({A: True, B: True})  # nothing known of B's load: A would win the tie
    link.loads[B] = NodeLoad.of({KEY: ModelLoad(True, 0, 0, 1)})  # but B has the model loaded, A does not
    link.answers[B] = [FakeReply()]
    await router.serve(spec(), body(), call(router))
    assert [s[0] for s in link.sent] == [B] and obs.routed_calls == [(KEY, B)]


async def test_a_holder_whose_load_cannot_be_fetched_costs_the_call_nothing_but_the_poll() -> None:
    router, link, obs, _ = make({A: True, B: True})  # B's load poll fails (no load in the fake link)
    assert await router.serve(spec(), body(), call(router)) == {"ran": "here"}
    assert not link.sent and obs.routed_calls == [(KEY, A)]


async def test_a_busy_local_holder_sends_the_next_call_to_an_idle_peer() -> None:
    router, link, obs, scheduler = make({A: True, B: True})
    link.loads[B] = NodeLoad.of({KEY: ModelLoad(True, 0, 0, 1)})
    router.book.report(B, link.loads[B], 100.0)
    scheduler.rows = [LoadedModel(KEY, BlobDigest("sha256:" + "0" * 64), 1, None, 256, active_requests=1)]
    link.answers[B] = [FakeReply()]
    await router.serve(spec(), body(), call(router))
    assert [s[0] for s in link.sent] == [B] and obs.routed_calls == [(KEY, B)]


# ------------------------------------------------------------------ forwarding


async def test_a_call_is_forwarded_unchanged_as_a_signed_hop_and_the_reply_relayed() -> None:
    router, link, obs, _ = make({A: False, B: True})
    link.answers[B] = [FakeReply(headers={"content-type": "application/json", "x-omx-node": B},
                                 pieces=[b'{"response":', b' "hi"}'])]
    c = call(router)
    result = await router.serve(spec(), body(), c)
    assert isinstance(result, Reply) and result.body == b'{"response": "hi"}' and result.status == 200
    assert result.media_type == "application/json"
    node, method, path, headers, sent = link.sent[0]
    assert (node, method, path, sent) == (B, "POST", "/api/generate?x=1", b'{"model":"tiny","prompt":"hi"}')
    assert headers[HOP_HEADER] == "1" and "authorization" not in {k.lower() for k in headers}
    assert c.response_headers[NODE_HEADER] == B
    assert obs.routed_calls == [(KEY, B)] and router.book.outstanding(B, KEY) == 0


async def test_a_client_error_from_the_peer_is_the_answer() -> None:
    router, link, obs, _ = make({A: False, B: True, C: True})
    link.answers[B] = [FakeReply(400, pieces=[b'{"error": "bad option"}'])]
    link.answers[C] = [FakeReply(400, pieces=[b'{"error": "bad option"}'])]
    result = await router.serve(spec(), body(), call(router))
    assert isinstance(result, Reply) and result.status == 400 and json.loads(result.body) == {"error": "bad option"}
    assert len(link.sent) == 1 and obs.retries == 0


@pytest.mark.parametrize("failure", [
    PeerError("refused"),
    FakeReply(503, pieces=[b'{"error": "server busy"}']),
    FakeReply(404, pieces=[b'{"error": "model \'tiny\' not found"}']),
    FakeReply(500, pieces=[b'{"error": "internal error"}']),
    FakeReply(401, pieces=[b'{"error": "peer request signature does not match"}']),
    FakeReply(200, pieces=[b'{"done":'], breaks=True),
    FakeReply(200, headers={"content-type": "application/x-ndjson"}, pieces=[], breaks=True),
], ids=["refused", "503", "404", "500", "401", "json-cut", "stream-cut-before-first-byte"])
async def test_a_failure_before_the_first_byte_is_retried_on_the_next_holder(failure: Answer) -> None:
    clock = [100.0]
    router, link, obs, _ = make({A: False, B: True, C: True}, clock=clock)
    link.answers[B] = [failure]
    link.answers[C] = [FakeReply(headers={"content-type": "application/json", "x-omx-node": C})]
    c = call(router)
    result = await router.serve(spec(), body(), c)
    assert isinstance(result, Reply) and result.body == b'{"ok": true}'
    assert [s[0] for s in link.sent] == [B, C] and obs.retries == 1 and obs.routed_calls == [(KEY, C)]
    assert c.response_headers[NODE_HEADER] == C
    assert router.book.outstanding(B, KEY) == 0 and router.book.outstanding(C, KEY) == 0
    # B is avoided for a moment: the next call goes to C first...
    link.sent.clear()
    await router.serve(spec(), body(), call(router))
    assert [s[0] for s in link.sent] == [C]
    # ...and is a candidate again once that moment has passed.
    clock[0] += 10.0
    router.book.report(C, NodeLoad.of({KEY: ModelLoad(True, 3, 0, 1)}), clock[0])
    link.sent.clear()
    link.answers[B] = [FakeReply()]
    await router.serve(spec(), body(), call(router))
    assert [s[0] for s in link.sent] == [B]


async def test_tries_are_bounded_and_the_last_failure_is_a_503() -> None:
    router, link, obs, _ = make({A: False, B: True, C: True, D: True})
    with pytest.raises(ServiceBusy) as info:
        await router.serve(spec(), body(), call(router))
    assert len(link.sent) == 3 and obs.retries == 2 and obs.routed_calls == []
    assert "no node holding model 'tiny' could serve it" in info.value.message


async def test_a_model_held_only_by_nodes_that_are_down_is_a_503_saying_so() -> None:
    router, link, _, _ = make({A: False, B: True, C: True}, dead=(B, C))
    with pytest.raises(ServiceBusy) as info:
        await router.serve(spec(), body(), call(router))
    assert info.value.retry_after > 0 and "down" in info.value.message
    assert B in info.value.message and C in info.value.message and not link.sent


async def test_a_failed_remote_falls_back_to_the_local_copy() -> None:
    router, link, _, scheduler = make({A: True, B: True})
    scheduler.rows = [LoadedModel(KEY, BlobDigest("sha256:" + "0" * 64), 1, None, 256, active_requests=3)]
    c = call(router)
    assert await router.serve(spec(), body(), c) == {"ran": "here"}
    assert [s[0] for s in link.sent] == [B] and c.response_headers[NODE_HEADER] == A


# ------------------------------------------------------------------ streams


def ndjson_reply(pieces: list[bytes], *, breaks: bool = False) -> FakeReply:
    return FakeReply(headers={"content-type": "application/x-ndjson", "x-omx-node": B}, pieces=pieces, breaks=breaks)


async def test_a_stream_is_relayed_byte_for_byte() -> None:
    router, link, _, _ = make({A: False, B: True})
    pieces = [b'{"response":"a","done":false}\n', b'{"response":"b",', b'"done":false}\n{"done"', b':true}\n']
    reply = ndjson_reply(pieces)
    link.answers[B] = [reply]
    result = await router.serve(spec(), body(), call(router))
    assert isinstance(result, ByteStream) and result.media_type == "application/x-ndjson"
    assert router.book.outstanding(B, KEY) == 1  # running until the stream ends
    assert await collect(result) == b"".join(pieces)
    assert reply.closed and router.book.outstanding(B, KEY) == 0


async def test_a_stream_cut_after_the_first_byte_ends_with_an_error_line() -> None:
    router, link, obs, _ = make({A: False, B: True, C: True})
    link.answers[B] = [ndjson_reply([b'{"response":"a","done":false}\n{"respo'], breaks=True)]
    result = await router.serve(spec(), body(), call(router))
    assert isinstance(result, ByteStream)
    lines = (await collect(result)).splitlines()
    assert json.loads(lines[0]) == {"response": "a", "done": False}
    assert len(lines) == 2 and B in json.loads(lines[1])["error"]  # the partial line was dropped
    assert [s[0] for s in link.sent] == [B] and obs.retries == 0


async def test_an_sse_stream_cut_ends_with_an_openai_error_event() -> None:
    router, link, _, _ = make({A: False, B: True})
    link.answers[B] = [FakeReply(headers={"content-type": "text/event-stream; charset=utf-8"},
                                 pieces=[b'data: {"id":1}\n\n', b"data: {"], breaks=True)]
    result = await router.serve(spec(), body(), call(router))
    assert isinstance(result, ByteStream)
    events = (await collect(result)).split(b"\n\n")
    assert events[0] == b'data: {"id":1}'
    error = json.loads(events[1].removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error" and B in error["message"] and events[2:] == [b""]


async def test_closing_a_relayed_stream_closes_the_peer_reply() -> None:
    router, link, _, _ = make({A: False, B: True})
    reply = ndjson_reply([b'{"a":1}\n', b'{"b":2}\n'])
    link.answers[B] = [reply]
    result = await router.serve(spec(), body(), call(router))
    assert isinstance(result, ByteStream)
    chunks = cast(Any, result.chunks)
    assert await chunks.__anext__() == b'{"a":1}\n'
    await chunks.aclose()  # what the adapter does when the client goes away
    assert reply.closed and router.book.outstanding(B, KEY) == 0


# ------------------------------------------------------------------ load


async def test_a_load_header_on_a_reply_updates_the_estimate() -> None:
    router, link, _, _ = make({A: False, B: True})
    header = load_to_header(NodeLoad.of({KEY: ModelLoad(True, 1, 4, 2)}, free_memory=7))
    link.answers[B] = [FakeReply(headers={"content-type": "application/json", LOAD_HEADER.lower(): header})]
    await router.serve(spec(), body(), call(router))
    # The report counted our request (5 busy), which has finished since: 2 running, 2 waiting.
    assert router.book.estimate(B, KEY, 100.0) == ModelLoad(True, 2, 2, 2)
    assert router.book.free_memory(B, 100.0) == 7


async def test_stale_peer_loads_are_polled_while_requests_flow() -> None:
    router, link, _, _ = make({A: False, B: True})
    link.loads[B] = NodeLoad.of({KEY: ModelLoad(True, 2, 0, 1)})
    link.answers[B] = [FakeReply()]
    await router.serve(spec(), body(), call(router))  # no report yet: a poll was started
    for _ in range(3):
        await asyncio.sleep(0)
    assert router.book.estimate(B, KEY, 100.0) == ModelLoad(True, 2, 0, 1)
    assert not router.book.wants_refresh(B, 100.4)  # fresh for half a second


async def test_a_hop_call_runs_here_and_reports_this_nodes_load() -> None:
    router, link, obs, scheduler = make({A: True, B: True}, local=A)
    c = call(router, hop=True)
    assert await router.serve(spec(), body(), c) == {"ran": "here"}
    assert not link.sent and obs.routed_calls == []
    load = load_from_header(c.response_headers[LOAD_HEADER])
    assert load.model(KEY).busy == 1  # the report counts the call that carries it
    assert router.local_load().model(KEY).busy == 0


async def test_a_streamed_hop_call_is_counted_until_its_stream_ends() -> None:
    router, _, _, _ = make({A: True})

    async def tokens(_body: Any, _call: Call) -> AsyncIterator[str]:
        async def gen() -> AsyncIterator[str]:
            yield "a"
            yield "b"
        return gen()

    c = call(router, hop=True)
    stream = await router.serve(spec(tokens, "ndjson"), body(), c)
    assert LOAD_HEADER not in c.response_headers
    assert await stream.__anext__() == "a"
    assert load_from_header(c.response_headers[LOAD_HEADER]).model(KEY) == ModelLoad(False, 0, 1, 1)
    assert router.local_load().model(KEY).busy == 1
    assert [x async for x in stream] == ["b"]
    assert router.local_load().models == {}


async def test_a_failing_local_handler_is_not_counted_any_more() -> None:
    router, _, _, _ = make({A: True})

    async def fails(_body: Any, _call: Call) -> Any:
        raise ServiceBusy()

    with pytest.raises(ServiceBusy):
        await router.serve(spec(fails), body(), call(router))
    assert router.local_load().models == {}


# ------------------------------------------------------------------ hop authentication


def test_a_hop_request_is_authenticated_by_the_peer_signature_not_an_api_key() -> None:
    key = b"k" * 32
    dispatcher = Dispatcher(api_keys=["client-key"], peer_verifier=peer_verifier(Verifier(key)))
    raw = b'{"model":"tiny"}'
    routed = spec()
    signed = {k.lower(): v for k, v in sign(key, "omx-b", "POST", "/api/generate", raw).items()}
    hop = Call(services=cast(Any, None), spec=routed, path="/api/generate", headers={**signed, "x-omx-hop": "1"})
    dispatcher.precheck(routed, hop)
    dispatcher.authorize(routed, hop, body_digest(raw))
    assert hop.hop and hop.peer == "omx-b"
    forged = Call(services=cast(Any, None), spec=routed, path="/api/generate",
                  headers={"x-omx-hop": "1", "authorization": "Bearer client-key"})
    with pytest.raises(Unauthorized):
        dispatcher.precheck(routed, forged)  # a client cannot pass off its request as a peer's
    tampered = Call(services=cast(Any, None), spec=routed, path="/api/generate",
                    headers={**{k.lower(): v for k, v in sign(key, "omx-b", "POST", "/api/generate", raw).items()},
                             "x-omx-hop": "1"})
    dispatcher.precheck(routed, tampered)
    with pytest.raises(Unauthorized):
        dispatcher.authorize(routed, tampered, body_digest(b'{"model":"other"}'))
    not_hop = HandlerSpec(name="tags", path="/api/tags", methods=("GET",), func=_local_json)
    plain = Call(services=cast(Any, None), spec=not_hop, path="/api/tags", headers={"x-omx-hop": "1"})
    with pytest.raises(Unauthorized, match="API key"):
        dispatcher.precheck(not_hop, plain)  # no hop handler: the header means nothing, the key is needed
    assert not plain.hop


# ------------------------------------------------------------------ cluster-wide views


def tags_reply(*names: str) -> FakeReply:
    rows = [{"name": n, "model": n, "size": 1, "digest": "ab", "details": {"format": "gguf"}} for n in names]
    return FakeReply(pieces=[json.dumps({"models": rows}).encode()])


async def test_remote_tags_lists_what_only_peers_hold_with_their_holders() -> None:
    snap = cluster({A: holdings(model("gone"), model("shared")), B: holdings(model("tiny"), model("shared")),
                    C: holdings(model("shared"), model("quiet"))})
    router, link, _, _ = make({A: False})
    link.snap = snap
    link.answers[B] = [tags_reply("tiny:latest", "shared:latest")]
    link.answers[C] = [PeerError("down")]
    rows = await remote_tags(router, ["shared:latest"])  # A's store no longer has "gone": its inventory lags
    assert [(r["name"], r["held_by"]) for r in rows] == [("quiet:latest", [C]), ("tiny:latest", [B])]
    tiny = rows[1]
    assert tiny["details"] == {"format": "gguf"} and tiny["status"] == "ready"  # as B lists it
    quiet = rows[0]
    assert quiet["size"] == model("quiet").size and quiet["details"] == {}  # C did not answer: from its inventory
    assert all(s[2] == "/api/tags" and s[3][HOP_HEADER] == "1" for s in link.sent)
    link.sent.clear()
    await remote_tags(router, ["shared:latest"])
    assert [s[0] for s in link.sent] == [C]  # B's rows are cached until its inventory changes


async def test_ps_lists_every_nodes_loaded_models_with_the_node() -> None:
    router, link, _, _ = make({A: False, B: False, C: False})
    link.answers[B] = [FakeReply(pieces=[b'{"models": [{"name": "tiny:latest"}]}'])]
    link.answers[C] = [PeerError("down")]
    rows = await cluster_ps(router, [{"name": "here:latest"}])
    assert rows == [{"name": "here:latest", "node": A}, {"name": "tiny:latest", "node": B}]


async def test_show_of_a_model_held_elsewhere_asks_its_holders_in_turn() -> None:
    router, link, _, _ = make({A: False, B: True, C: True})
    link.answers[B] = [FakeReply(404, pieces=[b'{"error": "model not found"}'])]
    link.answers[C] = [FakeReply(pieces=[b'{"modelfile": "FROM x"}'])]
    assert await show_elsewhere(router, "tiny", b'{"model":"tiny"}') == {"modelfile": "FROM x"}
    assert [(s[0], s[2], s[4]) for s in link.sent] == [(B, "/api/show", b'{"model":"tiny"}'),
                                                      (C, "/api/show", b'{"model":"tiny"}')]
    assert await show_elsewhere(router, "other", b"{}") is None


async def test_a_stream_that_fails_before_its_first_token_is_retried() -> None:
    router, link, obs, _ = make({A: False, B: True, C: True})
    link.answers[B] = [ndjson_reply([b'{"error":"runner for model \'tiny\' exited unexpectedly"}\n'])]
    link.answers[C] = [ndjson_reply([b'{"response":"a","done":false}\n', b'{"done":true}\n'])]
    result = await router.serve(spec(), body(), call(router))
    assert isinstance(result, ByteStream)
    assert await collect(result) == b'{"response":"a","done":false}\n{"done":true}\n'
    assert [s[0] for s in link.sent] == [B, C] and obs.retries == 1


async def test_an_in_process_call_forwards_its_validated_body() -> None:
    class Body(BaseModel):
        model: str
        prompt: str = ""
        stream: bool = True

    router, link, _, _ = make({A: False, B: True})
    link.answers[B] = [FakeReply()]
    await router.serve(spec(), Body(model="tiny", prompt="hi"), call(router, body=b""))
    assert json.loads(link.sent[0][4]) == {"model": "tiny", "prompt": "hi"}


async def test_tending_polls_alive_peers_needed_lately_and_forgets_departed_ones() -> None:
    router, link, _, _ = make({A: False, B: True, C: True}, dead=(C,))
    link.loads[B] = NodeLoad.of({KEY: ModelLoad(True, 1, 0, 1)})
    router.book.report(C, NodeLoad(), 100.0)
    router.tags_cache[C] = ("v", [])
    router.tend()  # nobody needed B's load yet: an idle router polls no one
    for _ in range(3):
        await asyncio.sleep(0)
    assert router.book.estimate(B, KEY, 100.0) is None
    assert C not in router.book.known() and C not in router.tags_cache
    router.book.needed(B, router.clock())  # e.g. a call ranked it
    router.tend()
    for _ in range(3):
        await asyncio.sleep(0)
    assert router.book.estimate(B, KEY, 100.0) == ModelLoad(True, 1, 0, 1)


async def test_asking_for_a_peers_load_polls_it_once_it_is_getting_old() -> None:
    router, link, _, _ = make({A: False, B: True})
    link.loads[B] = NodeLoad.of({KEY: ModelLoad(True, 2, 0, 4)})
    assert router.node_load(B) is None  # nothing known yet: the ask starts a poll
    for _ in range(3):
        await asyncio.sleep(0)
    load = router.node_load(B)
    assert load is not None and load.model(KEY).in_flight == 2
