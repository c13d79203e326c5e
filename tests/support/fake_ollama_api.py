"""A FAKE Ollama API server for CLI formatting and flow unit tests only.

It answers a handful of Ollama endpoints with canned data on a real socket
(stdlib ``ThreadingHTTPServer``, HTTP/1.1 with chunked NDJSON streaming) and
records every request, so CLI tests can assert what the CLI sent. It does no
inference and holds no store: tests of the real node use the real runtime.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["SLOW_PROMPT", "FakeOllamaApi", "Recorded"]

SLOW_PROMPT = "slow"
SLOW_DELAY_S = 0.05


@dataclass(frozen=True)
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    body: Any  # parsed JSON, raw bytes for blob uploads, None when empty


@dataclass
class FakeOllamaApi:
    """Canned state the handlers answer from; every field may be changed by a test."""

    models: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    show: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: set[str] = field(default_factory=set)
    generate_pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world"])
    final_metrics: dict[str, Any] = field(default_factory=lambda: {
        "total_duration": 1_500_000_000, "load_duration": 250_000_000, "prompt_eval_count": 10,
        "prompt_eval_duration": 100_000_000, "eval_count": 20, "eval_duration": 1_000_000_000,
        "done_reason": "stop",
    })
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeOllamaApi:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=20)

    def record(self, item: Recorded) -> None:
        with self._lock:
            self.requests.append(item)

    def bodies(self, path: str) -> list[Any]:
        """Bodies of the recorded requests to ``path`` (any method)."""
        with self._lock:
            return [r.body for r in self.requests if r.path == path]

    # ------------------------------------------------------------------ answers
    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """(status, JSON value | list of NDJSON objects) for one request."""
        if path == "/api/version":
            return 200, {"version": "9.9.9"}
        if path == "/api/tags":
            return 200, {"models": self.models}
        if path == "/api/ps":
            return 200, {"models": self.running}
        if path.startswith("/api/blobs/"):
            digest = path.removeprefix("/api/blobs/")
            if method == "HEAD":
                return (200 if digest in self.blobs else 404), None
            actual = "sha256:" + hashlib.sha256(body or b"").hexdigest()
            if actual != digest:
                return 400, {"error": "digest mismatch"}
            self.blobs.add(digest)
            return 201, None
        name = (body or {}).get("model") or (body or {}).get("name") if isinstance(body, dict) else None
        if path == "/api/show":
            if name not in self.show:
                return 404, {"error": f"model '{name}' not found"}
            return 200, self.show[name]
        if path == "/api/delete":
            if not any(m["name"] == name for m in self.models):
                return 404, {"error": f"model '{name}' not found"}
            self.models = [m for m in self.models if m["name"] != name]
            return 200, None
        if path == "/api/copy":
            if body["source"] not in {m["name"] for m in self.models}:
                return 404, {"error": f"model '{body['source']}' not found"}
            return 200, None
        if path == "/api/create":
            missing = [d for d in (body.get("files") or {}).values() if d not in self.blobs]
            if missing:
                return 400, {"error": f"blob {missing[0]} not found"}
            return 200, [{"status": "parsing GGUF"}, {"status": "writing manifest"}, {"status": "success"}]
        if path in ("/api/generate", "/api/chat"):
            if name not in self.show:
                return 404, {"error": f"model '{name}' not found"}
            return 200, self._generation(path, body)
        return 404, {"error": "404 page not found"}

    def _generation(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        if path == "/api/generate":
            pieces = [{"model": body["model"], "response": p, "done": False} for p in self.generate_pieces]
            return [*pieces, {"model": body["model"], "response": "", "done": True, **self.final_metrics}]
        if body["messages"][-1]["content"] == SLOW_PROMPT:
            # A long reply the client is expected to cancel (Ctrl+C) part way.
            return [{"model": body["model"], "message": {"role": "assistant", "content": "tick "}, "done": False}
                    for _ in range(400)]
        # The chat reply names the turn so tests can tell replies apart.
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        reply = [f"reply {turn}", f" to {body['messages'][-1]['content']}"]
        chunks = [{"model": body["model"], "message": {"role": "assistant", "content": p}, "done": False}
                  for p in reply]
        return [*chunks, {"model": body["model"], "message": {"role": "assistant", "content": ""},
                          "done": True, **self.final_metrics}]


def _handler_for(state: FakeOllamaApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            return

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path.startswith("/api/blobs/"):
                return raw
            return json.loads(raw) if raw else None

        def _serve(self) -> None:
            body = self._body()
            state.record(Recorded(self.command, self.path, body))
            status, payload = state.answer(self.command, self.path, body)
            if isinstance(payload, list):
                self.send_response(status)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                slow = len(payload) > 100
                try:
                    for item in payload:
                        data = json.dumps(item).encode() + b"\n"
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        if slow:
                            time.sleep(SLOW_DELAY_S)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_HEAD = _serve

    return Handler
