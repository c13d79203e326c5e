"""An asyncio client for the Serf agent's msgpack RPC protocol.

One TCP connection carries many commands: each request is a header
``{Command, Seq}`` optionally followed by a body, and each answer is a header
``{Seq, Error}`` optionally followed by a body. Streams (``stream``,
``monitor``, ``query``) answer once with a bare header and then push
header+body records tagged with their ``Seq``. A single reader task routes
everything by ``Seq``: plain calls resolve a future, streams feed a queue.

Whether a body follows a header is not on the wire; it depends on the command,
so the client remembers every ``Seq`` it may still hear from (stopped streams
included) to keep the decoder in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

from omx.mesh.errors import SerfConnectionError, SerfRPCError, SerfTimeout
from omx.mesh.records import Member, QueryResponse, SerfEvent, decode_event, decode_member

__all__ = ["RpcStream", "SerfRPC"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Commands whose answer header is always followed by a body.
_BODY_COMMANDS = frozenset({
    "join", "members", "members-filtered", "stats", "get-coordinate",
    "install-key", "use-key", "remove-key", "list-keys",
})
_STREAM_QUEUE_LIMIT = 4096
_END = object()


@dataclass(eq=False)
class _Call:
    future: asyncio.Future[Any]
    has_body: bool


@dataclass(eq=False)
class _Stream:
    ack: asyncio.Future[None]
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    closed: bool = False
    error: Exception | None = None

    def finish(self, error: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        self.queue.put_nowait(_END)


class RpcStream(Generic[T]):
    """Async iterator over one Serf stream; ``aclose()`` sends ``stop``.

    Iteration ends cleanly after :meth:`aclose`, and raises
    :class:`SerfConnectionError` if the connection drops (resubscribe then).
    """

    def __init__(self, rpc: SerfRPC, seq: int, slot: _Stream, decode: Callable[[Any], T | None]) -> None:
        self._rpc = rpc
        self.seq = seq
        self._slot = slot
        self._decode = decode

    def __aiter__(self) -> RpcStream[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            item = await self._slot.queue.get()
            if item is _END:
                self._slot.queue.put_nowait(_END)  # later calls end too
                if self._slot.error is not None:
                    raise self._slot.error
                raise StopAsyncIteration
            value = self._decode(item)
            if value is not None:
                return value

    async def aclose(self) -> None:
        """Stop the stream on the agent (best effort) and end iteration."""
        if self._slot.closed:
            return
        self._slot.finish()
        with contextlib.suppress(SerfRPCError, SerfConnectionError):
            await self._rpc._request("stop", {"Stop": self.seq})

    async def __aenter__(self) -> RpcStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SerfRPC:
    """A connection to one Serf agent's RPC port; every call has a timeout.

    Use :meth:`connect`. If the connection drops, pending calls and streams
    fail with :class:`SerfConnectionError`; the next call reconnects (once),
    and :meth:`reconnect` does so explicitly. Streams are not resumed.
    """

    def __init__(self, host: str, port: int, auth_key: str | None = None, *, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._auth_key = auth_key
        self._seq = 0
        self._slots: dict[int, _Call | _Stream] = {}
        self._pending_body: tuple[_Call | _Stream, Mapping[str, Any]] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(cls, host: str, port: int, auth_key: str | None = None,
                      timeout: float = 5.0) -> SerfRPC:  # noqa: ASYNC109 - per-call default, not a deadline
        """Open a connection, then perform ``handshake`` and ``auth``."""
        rpc = cls(host, port, auth_key, timeout=timeout)
        await rpc._open()
        return rpc

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _open(self) -> None:
        async with self._open_lock:
            if self.connected:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout)
            except (OSError, TimeoutError) as exc:
                raise SerfConnectionError(
                    f"cannot reach serf RPC at {self.host}:{self.port}: {exc or 'timeout'}") from exc
            self._slots.clear()
            self._pending_body = None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_loop(reader, writer), name="serf-rpc-reader")
            try:
                await self._request("handshake", {"Version": 1}, reconnect=False)
                if self._auth_key:
                    await self._request("auth", {"AuthKey": self._auth_key}, reconnect=False)
            except BaseException:
                await self._drop()
                raise

    async def reconnect(self) -> None:
        """Drop the current connection (failing what waits on it) and open a new one."""
        await self._drop()
        self._closed = False
        await self._open()

    async def close(self) -> None:
        """Close the connection for good; later calls raise :class:`SerfConnectionError`."""
        self._closed = True
        await self._drop()

    async def _drop(self) -> None:
        writer, task = self._writer, self._reader_task
        self._writer, self._reader_task = None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(SerfConnectionError("connection to serf agent closed"))

    async def __aenter__(self) -> SerfRPC:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ reading

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, unicode_errors="surrogateescape")
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                unpacker.feed(data)
                for obj in unpacker:
                    self._dispatch(obj)
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            log.warning("serf RPC read failed: %s", exc)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._fail_all(SerfConnectionError("connection to serf agent lost"))

    def _dispatch(self, obj: Any) -> None:
        if self._pending_body is not None:
            slot, header = self._pending_body
            self._pending_body = None
            self._deliver_body(slot, header, obj)
            return
        if not isinstance(obj, dict) or "Seq" not in obj:
            log.warning("serf RPC: unexpected frame %r", obj)
            return
        seq, error = int(obj["Seq"]), obj.get("Error") or ""
        target = self._slots.get(seq)
        if target is None:
            log.debug("serf RPC: answer for unknown seq %d", seq)
            return
        if isinstance(target, _Call):
            if target.has_body:
                self._pending_body = (target, obj)
                return
            del self._slots[seq]
            _settle(target.future, error, None)
        elif not target.ack.done():
            if error:
                del self._slots[seq]
                target.finish(SerfRPCError(error))
            _settle(target.ack, error, None)
        else:
            self._pending_body = (target, obj)

    def _deliver_body(self, slot: _Call | _Stream, header: Mapping[str, Any], body: Any) -> None:
        error = header.get("Error") or ""
        if isinstance(slot, _Call):
            self._slots.pop(int(header["Seq"]), None)
            _settle(slot.future, error, body)
            return
        if slot.closed:
            return
        if slot.queue.qsize() >= _STREAM_QUEUE_LIMIT:
            # A consumer this far behind must resynchronise rather than block the reader.
            slot.finish(SerfRPCError("serf stream overflowed; resubscribe"))
            return
        slot.queue.put_nowait(body)

    def _fail_all(self, error: Exception) -> None:
        slots, self._slots = self._slots, {}
        self._pending_body = None
        for slot in slots.values():
            if isinstance(slot, _Call):
                if not slot.future.done():
                    slot.future.set_exception(error)
            else:
                if not slot.ack.done():
                    slot.ack.set_exception(error)
                slot.finish(error)

    # ------------------------------------------------------------ writing

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    async def _send(self, command: str, seq: int, body: Mapping[str, Any] | None) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise SerfConnectionError("not connected to serf agent")
        frame = msgpack.packb({"Command": command, "Seq": seq}, use_bin_type=True)
        if body is not None:
            frame += msgpack.packb(body, use_bin_type=True)
        async with self._write_lock:
            try:
                writer.write(frame)
                await asyncio.wait_for(writer.drain(), self.timeout)
            except (OSError, TimeoutError) as exc:
                raise SerfConnectionError(f"writing to serf agent failed: {exc or 'timeout'}") from exc

    async def _ensure_open(self, reconnect: bool) -> None:
        if self._closed:
            raise SerfConnectionError("serf RPC client is closed")
        if not self.connected and reconnect:
            await self._open()

    async def _request(self, command: str, body: Mapping[str, Any] | None = None, *,
                       wait_s: float | None = None, reconnect: bool = True) -> Any:
        await self._ensure_open(reconnect)
        seq = self._next_seq()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._slots[seq] = _Call(future, command in _BODY_COMMANDS)
        await self._send(command, seq, body)
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait_s or self.timeout)
        except TimeoutError as exc:
            # The slot stays registered so a late answer (and its body) is still consumed.
            raise SerfTimeout(f"serf RPC {command!r} timed out") from exc

    async def _open_stream(self, command: str, body: Mapping[str, Any],
                           decode: Callable[[Any], T | None]) -> RpcStream[T]:
        await self._ensure_open(True)
        seq = self._next_seq()
        slot = _Stream(asyncio.get_running_loop().create_future())
        self._slots[seq] = slot
        await self._send(command, seq, body)
        try:
            await asyncio.wait_for(asyncio.shield(slot.ack), self.timeout)
        except TimeoutError as exc:
            slot.finish(SerfTimeout(f"serf RPC {command!r} timed out"))
            raise SerfTimeout(f"serf RPC {command!r} timed out") from exc
        return RpcStream(self, seq, slot, decode)

    # ------------------------------------------------------------ commands

    async def members(self) -> list[Member]:
        """All members this agent knows, in every status."""
        body = await self._request("members")
        return [decode_member(m) for m in body.get("Members") or ()]

    async def members_filtered(self, tags: Mapping[str, str] | None = None, status: str | None = None,
                               name: str | None = None) -> list[Member]:
        """Members matching tag, status and name regexes (anchored by Serf)."""
        req: dict[str, Any] = {"Tags": dict(tags or {}), "Status": status or "", "Name": name or ""}
        body = await self._request("members-filtered", req)
        return [decode_member(m) for m in body.get("Members") or ()]

    async def join(self, addrs: Sequence[str], replay: bool = False, *, wait_s: float | None = None) -> int:
        """Join the cluster through ``addrs`` (``host:port``); returns how many were reached."""
        body = await self._request("join", {"Existing": list(addrs), "Replay": replay},
                                   wait_s=wait_s or max(self.timeout, 10.0))
        return int(body.get("Num", 0))

    async def leave(self) -> None:
        """Leave gracefully; the agent then shuts down and closes the connection."""
        await self._request("leave", wait_s=max(self.timeout, 15.0))

    async def force_leave(self, node: str) -> None:
        """Mark a failed node as left."""
        await self._request("force-leave", {"Node": node})

    async def tags(self, set: Mapping[str, str] | None = None, delete: Sequence[str] = ()) -> None:  # noqa: A002
        """Add/replace tags in ``set`` and remove the keys in ``delete``."""
        await self._request("tags", {"Tags": dict(set or {}), "DeleteTags": list(delete)})

    async def user_event(self, name: str, payload: bytes = b"", coalesce: bool = True) -> None:
        """Broadcast a user event to the cluster."""
        await self._request("event", {"Name": name, "Payload": bytes(payload), "Coalesce": coalesce})

    async def stream(self, event_filter: str = "*") -> RpcStream[SerfEvent]:
        """Subscribe to events (``*``, ``member-join,user:deploy``, ``query``…)."""
        return await self._open_stream("stream", {"Type": event_filter}, decode_event)

    async def monitor(self, log_level: str = "INFO") -> RpcStream[str]:
        """Stream the agent's log lines at ``log_level`` or above."""
        return await self._open_stream("monitor", {"LogLevel": log_level}, lambda b: str(b.get("Log", "")))

    async def query(self, name: str, payload: bytes = b"", *, filter_nodes: Sequence[str] = (),
                    filter_tags: Mapping[str, str] | None = None, timeout_s: float | None = None,
                    request_ack: bool = False) -> list[QueryResponse]:
        """Issue a query and collect the responses until Serf reports it done."""
        req: dict[str, Any] = {
            "FilterNodes": list(filter_nodes), "FilterTags": dict(filter_tags or {}),
            "RequestAck": request_ack, "Timeout": int((timeout_s or 0) * 1e9),
            "Name": name, "Payload": bytes(payload),
        }
        stream = await self._open_stream("query", req, _decode_query_record)
        responses: list[QueryResponse] = []

        async def collect() -> None:
            async for record in stream:
                if record == "done":
                    return
                if isinstance(record, QueryResponse):
                    responses.append(record)

        try:
            await asyncio.wait_for(collect(), (timeout_s or 15.0) + self.timeout)
        except TimeoutError as exc:
            raise SerfTimeout(f"serf query {name!r} did not finish") from exc
        finally:
            stream._slot.finish()  # "done" ends the query on the agent's side too
        return responses

    async def respond(self, query_id: int, payload: bytes = b"") -> None:
        """Answer a :class:`QueryEvent` received on a stream of this connection."""
        await self._request("respond", {"ID": query_id, "Payload": bytes(payload)})

    async def stats(self) -> dict[str, dict[str, str]]:
        """The agent's debugging statistics (``agent``, ``serf``, ``runtime``… sections)."""
        body = await self._request("stats")
        return {str(k): dict(v) if isinstance(v, dict) else v for k, v in body.items()}

    async def get_coordinate(self, node: str) -> dict[str, Any] | None:
        """The network coordinate of ``node``, or ``None`` if unknown."""
        body = await self._request("get-coordinate", {"Node": node})
        return dict(body["Coord"]) if body.get("Ok") else None


def _settle(future: asyncio.Future[Any], error: str, body: Any) -> None:
    if future.done():
        return
    if error:
        future.set_exception(SerfRPCError(error))
    else:
        future.set_result(body if body is not None else {})


def _decode_query_record(body: Mapping[str, Any]) -> QueryResponse | str | None:
    kind = body.get("Type")
    if kind == "response":
        payload = body.get("Payload") or b""
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogateescape")
        return QueryResponse(node=str(body.get("From", "")), payload=bytes(payload))
    if kind == "done":
        return "done"
    return None  # acks carry nothing callers need
