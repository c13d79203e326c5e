"""Signed requests to peers about custom functions (tables, announcements, sources, log lines).

Every request goes over the router's :class:`~omx.functions.router.PeerLink`
(HMAC-signed, pooled keep-alive connections to members' APIs) with a short
deadline; failures become :class:`~omx.errors.PeerError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omx.errors import PeerError
from omx.functions.custom_view import LogLine
from omx.functions.router import PeerLink, read_all
from omx.storage.functions_store import MAX_SOURCE_BYTES, FunctionRecord, record_from_json
from omx.types import NodeId

__all__ = ["PeerFunctions", "PeerTable", "TABLE_PATH"]

TABLE_PATH = "/api/peer/functions"
ANNOUNCE_PATH = "/api/peer/functions/announce"
SOURCE_PATH = "/api/peer/functions/sources/{version}"
LOGS_PATH = "/api/peer/functions/{name}/logs?after={after}"
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PeerTable:
    """What a peer said of its functions: its table, what it serves, its figures per function."""

    node: str
    records: tuple[FunctionRecord, ...]
    serving: dict[str, str] = field(default_factory=dict)
    """Function name -> the version the peer serves now."""
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: str = ""
    """The table's digest as the peer computed it (compared with the ``fn`` tag it gossips)."""


def parse_records(doc: Any) -> list[FunctionRecord]:
    """The valid records of a table document (invalid ones are skipped, never fatal)."""
    raw = doc.get("functions") if isinstance(doc, dict) else None
    records = []
    for item in raw if isinstance(raw, list) else []:
        try:
            records.append(record_from_json(item))
        except ValueError:
            continue
    return records


def _figures(doc: Any) -> dict[str, dict[str, Any]]:
    raw = doc.get("figures") if isinstance(doc, dict) else None
    out: dict[str, dict[str, Any]] = {}
    for name, fig in (raw.items() if isinstance(raw, dict) else ()):
        if not isinstance(fig, dict):
            continue
        lat = fig.get("latencies")
        out[str(name)] = {"calls": int(fig.get("calls") or 0), "errors": int(fig.get("errors") or 0),
                          "latencies": [float(x) for x in lat if isinstance(x, int | float)]
                          if isinstance(lat, list) else []}
    return out


class PeerFunctions:
    """The function host's side of the network."""

    def __init__(self, link: PeerLink, alive_peers: Callable[[], list[str]], *,
                 on_sync: Callable[[str, int], None] | None = None,
                 version_of: Callable[[str], str | None] = lambda _node: None) -> None:
        self._link = link
        self.alive_peers = alive_peers
        self.version_of = version_of
        """The table digest an alive peer gossips (None: unknown)."""
        self._on_sync = on_sync
        """Told ``("functions", bytes)`` after each table pulled (the sync-traffic metrics)."""

    async def _get(self, node: str, method: str, path: str, body: bytes = b"",
                   limit: int = 16 << 20) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body else {}
        try:
            async with asyncio.timeout(TIMEOUT_S):
                reply = await self._link.request(NodeId(node), method, path, headers, body,
                                                  head_timeout_s=TIMEOUT_S)
                try:
                    return reply.status, await read_all(reply, limit)
                finally:
                    await reply.aclose()
        except TimeoutError as exc:
            raise PeerError(f"{node} did not answer {path} within {TIMEOUT_S:g} s") from exc

    async def table(self, node: str) -> PeerTable:
        status, raw = await self._get(node, "GET", TABLE_PATH)
        if status != 200:
            raise PeerError(f"{node} answered {TABLE_PATH} with status {status}")
        if self._on_sync is not None:
            self._on_sync("functions", len(raw))
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise PeerError(f"{node} sent an invalid function table") from exc
        serving = doc.get("serving") if isinstance(doc, dict) else None
        version = doc.get("table_version") if isinstance(doc, dict) else None
        return PeerTable(node, tuple(parse_records(doc)),
                         {str(k): str(v) for k, v in serving.items()} if isinstance(serving, dict) else {},
                         _figures(doc), version if isinstance(version, str) else "")

    async def announce(self, node: str, doc: dict[str, Any]) -> None:
        status, _ = await self._get(node, "POST", ANNOUNCE_PATH, json.dumps(doc).encode())
        if status >= 300:
            raise PeerError(f"{node} refused the announcement with status {status}")

    async def source(self, node: str, version: str) -> bytes:
        status, raw = await self._get(node, "GET", SOURCE_PATH.format(version=version), limit=MAX_SOURCE_BYTES)
        if status != 200:
            raise PeerError(f"{node} has no source {version[:12]} (status {status})")
        return raw

    async def logs(self, node: str, name: str, after: int) -> list[LogLine]:
        status, raw = await self._get(node, "GET", LOGS_PATH.format(name=name, after=after))
        if status == 404:
            return []
        if status != 200:
            raise PeerError(f"{node} answered the logs of {name} with status {status}")
        try:
            rows = json.loads(raw)["logs"]
            return [LogLine(float(r["time"]), str(r["node"]), str(r["version"]), str(r["line"]), int(r["seq"]))
                    for r in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerError(f"{node} sent invalid log lines") from exc
