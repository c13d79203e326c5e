"""The node's stable identity: generated at first start, kept in the home."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

from omx.types import NodeId

__all__ = ["load_or_create_node_id"]

_NODE_ID = re.compile(r"omx-[0-9a-f]{8}")


def load_or_create_node_id(home: Path) -> NodeId:
    """Read ``home/node_id`` or create it atomically (``omx-`` + 8 hex)."""
    path = home / "node_id"
    try:
        text = path.read_text(encoding="ascii").strip()
        if _NODE_ID.fullmatch(text):
            return NodeId(text)
    except (OSError, UnicodeDecodeError):
        pass
    home.mkdir(parents=True, exist_ok=True)
    node_id = "omx-" + secrets.token_hex(4)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".node_id.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(node_id + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return NodeId(node_id)
