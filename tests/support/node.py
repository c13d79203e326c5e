"""Real omx nodes for end-to-end tests: each a separate process with its own home."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["NodeProcess", "create_model", "start_node", "upload_blob", "wait_until"]

START_DEADLINE = 60.0


def wait_until(predicate: Any, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last failure
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


@dataclass
class NodeProcess:
    home: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120.0), **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL) if _own_group(self.proc) else self.proc.kill()
            self.proc.wait(10)


def _own_group(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def start_node(home: Path, *, host: str = "127.0.0.1", port: int = 0, args: Sequence[str] = (),
               env: dict[str, str] | None = None) -> NodeProcess:
    """Start ``omx start`` in a new process group and wait until it answers."""
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "node.log"
    full_env = {**os.environ, "OMX_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    if port == 0:
        # An ephemeral API port gets ephemeral gossip and web ports too, so nodes sharing 127.0.0.1 never clash.
        full_env.setdefault("OMX_P2P__PORT", "0")
        full_env.setdefault("OMX_WEB__PORT", "0")
    full_env.pop("OMX_HOST", None)
    cmd = [sys.executable, "-c", "from omx.cli.main import main; main()", "start",
           "--host", host, "--api-port", str(port), *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node = NodeProcess(home=home, proc=proc, log_path=log_path)
    node_json = home / "run" / "node.json"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{node.log()}")
        if not node_json.exists():
            return False
        info = json.loads(node_json.read_text())
        if info.get("pid") != proc.pid:
            return False
        node.info, node.url = info, info["url"]
        return httpx.get(info["url"] + "/", timeout=2).status_code == 200

    try:
        wait_until(ready, timeout=START_DEADLINE, what="node to answer")
    except BaseException:
        node.kill()
        raise
    return node


def upload_blob(client: httpx.Client, path: Path) -> str:
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if client.head(f"/api/blobs/{digest}").status_code != 200:
        with open(path, "rb") as f:
            r = client.post(f"/api/blobs/{digest}", content=f)
        assert r.status_code == 201, r.text
    return digest


def create_model(client: httpx.Client, name: str, gguf: Path, **fields: Any) -> list[dict[str, Any]]:
    """Upload ``gguf`` and create ``name`` from it; returns the progress lines."""
    digest = upload_blob(client, gguf)
    body = {"model": name, "files": {gguf.name: digest}, **fields}
    lines = []
    with client.stream("POST", "/api/create", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
    assert lines and lines[-1] == {"status": "success"}, lines
    return lines
