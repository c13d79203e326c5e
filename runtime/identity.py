"""The node's stable identity: generated at first start, kept in the home."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from omx.fsutil import atomic_write
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
    node_id = "omx-" + secrets.token_hex(4)
    atomic_write(path, node_id + "\n")
    return NodeId(node_id)
