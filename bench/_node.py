"""Starting one ``omx start`` process for a bench script (shared by the scripts in this folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["start_node"]


def start_node(home: Path, env: dict[str, str],
               ready: Callable[[dict[str, Any]], bool] = lambda _info: True,
               ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a node on 127.0.0.1 (any free API and gossip port) with ``env`` added; wait for its node.json."""
    full = {**os.environ, "OMX_HOME": str(home), "OMX_P2P__PORT": "0", **env}
    proc = subprocess.Popen([sys.executable, "-c", "from omx.cli.main import main; main()", "start",
                             "--host", "127.0.0.1", "--api-port", "0"], env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    node_json = home / "run" / "node.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if node_json.exists():
            info = json.loads(node_json.read_text())
            if info.get("pid") == proc.pid and ready(info):
                return proc, info
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the node did not start")
