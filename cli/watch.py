"""``omx status --watch``: a live view refreshed on cluster events and on an interval.

A daemon thread holds the node's WebSocket event stream (``/api/distributed/events``)
and wakes the drawing loop on every message; when the stream cannot be opened the
loop simply polls every ``interval`` seconds and keeps retrying the stream. Ctrl+C
ends the view with exit code 0.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from datetime import datetime

from rich.console import Group
from rich.live import Live
from rich.text import Text

from omx.cli.client import CliFailure, NodeClient, auth_headers
from omx.cli.output import console
from omx.cli.status_view import ClusterSnapshot, status_lines

__all__ = ["EventFeed", "events_url", "watch_status"]

_OPEN_TIMEOUT_S = 5.0

Fetch = Callable[[NodeClient], ClusterSnapshot]
"""Reads the node's state for one frame."""


def events_url(base_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/api/distributed/events``."""
    scheme, _, rest = base_url.rstrip("/").partition("://")
    return ("wss" if scheme == "https" else "ws") + "://" + rest + "/api/distributed/events"


def _describe(message: str | bytes) -> str:
    try:
        event = json.loads(message)
    except ValueError:
        return "event"
    if not isinstance(event, dict):
        return "event"
    kind = str(event.get("type") or "event")
    if kind == "member":
        node = event.get("node") or {}
        return f"member {node.get('id', '?')} {event.get('change', 'changed')} ({node.get('status', '?')})"
    if kind == "node_state":
        return f"node {event.get('node_id', '?')} state"
    return kind


class EventFeed(threading.Thread):
    """Reads the event stream in the background; sets ``wake`` on every message."""

    def __init__(self, url: str, wake: threading.Event, *, retry_s: float) -> None:
        super().__init__(name="omx-status-events", daemon=True)
        self.url = url
        self.wake = wake
        self.retry_s = retry_s
        self.connected = False
        self.last_event: str | None = None
        self._stopping = threading.Event()
        self._conn: object | None = None

    def run(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        while not self._stopping.is_set():
            try:
                with connect(self.url, open_timeout=_OPEN_TIMEOUT_S, close_timeout=1, proxy=None,
                             additional_headers=auth_headers()) as conn:
                    self._conn = conn
                    self.connected = True
                    for message in conn:
                        self.last_event = _describe(message)
                        self.wake.set()
            except (OSError, TimeoutError, WebSocketException):
                pass
            finally:
                self._conn = None
                if self.connected:
                    self.connected = False
                    self.wake.set()  # show the switch to polling at once
            self._stopping.wait(self.retry_s)

    def stop(self) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.close()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - closing a dying connection may fail in many ways
                pass


def _footer(feed: EventFeed, interval: float, refreshes: int) -> str:
    now = datetime.now().strftime("%H:%M:%S")
    mode = "live: event stream" if feed.connected else f"polling every {interval:g}s (event stream unavailable)"
    last = f" · last event: {feed.last_event}" if feed.connected and feed.last_event else ""
    return f"⟳ {mode} · updated {now} (#{refreshes}){last} · Ctrl+C to exit"


def _frame(client: NodeClient, fetch: Fetch, feed: EventFeed, interval: float, verbose: bool,
           refreshes: int) -> Group:
    try:
        lines = status_lines(fetch(client), verbose=verbose)
    except CliFailure as exc:
        lines = ["• OllamaMax Cluster Status", "━" * 25, f"❌ {exc.format_message()}",
                 f"   Retrying every {interval:g}s..."]
    return Group(*(Text(line) for line in lines), Text(""), Text(_footer(feed, interval, refreshes), style="dim"))


def watch_status(client: NodeClient, fetch: Fetch, *, interval: float, verbose: bool) -> None:
    """Redraw ``status`` (from ``fetch(client)``) until Ctrl+C (which returns normally)."""
    wake = threading.Event()
    feed = EventFeed(events_url(client.url), wake, retry_s=interval)
    feed.start()
    refreshes = 0
    try:
        with Live(console=console(), auto_refresh=False, transient=False) as live:
            while True:
                refreshes += 1
                live.update(_frame(client, fetch, feed, interval, verbose, refreshes), refresh=True)
                wake.wait(interval)
                wake.clear()
    except KeyboardInterrupt:
        # A second Ctrl+C during cleanup must not print a traceback either.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        feed.stop()
        client.close()
