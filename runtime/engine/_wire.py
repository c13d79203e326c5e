"""The framed IPC protocol between the node and a runner subprocess.

Frames are msgpack arrays written back to back on a pipe (msgpack is
self-delimiting, so no length prefix is needed): ``[op, request_id, *args]``.
Both sides import only this module and the standard library from the package,
so the runner starts fast.

Node -> runner::

    ["load", 0, config]                      first frame: what to load
    ["complete", id, request]                stream "t" frames, then "done"
    ["cancel", id]                           stop that generation at the next token
    ["tokenize", id, text, add_special]      -> "ok" [token, ...]
    ["detokenize", id, tokens]               -> "ok" text
    ["embed", id, inputs, normalize, truncate] -> "ok" [vectors, prompt_token_count]

Runner -> node::

    ["ready", 0, info]                       model loaded
    ["fatal", 0, message]                    load failed; the runner exits
    ["t", id, text]                          a streamed piece of valid UTF-8
    ["done", id, done]                       end of a generation (counts in ns)
    ["ok", id, value]                        result of a one-shot request
    ["err", id, kind, message]               kind: invalid | unsupported | cancelled | engine
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = [
    "ERR_CANCELLED",
    "ERR_ENGINE",
    "ERR_INVALID",
    "ERR_UNSUPPORTED",
    "RequestError",
    "decoder",
    "encode",
]

ERR_INVALID = "invalid"
ERR_UNSUPPORTED = "unsupported"
ERR_CANCELLED = "cancelled"
ERR_ENGINE = "engine"


class RequestError(Exception):
    """Raised inside the runner for a request-level failure with a wire ``kind``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


_packer_opts: dict[str, Any] = {"use_bin_type": True}


def encode(frame: list[Any]) -> bytes:
    """Serialize one frame."""
    data: bytes = msgpack.packb(frame, **_packer_opts)
    return data


def decoder() -> msgpack.Unpacker:
    """A streaming decoder: ``feed(bytes)`` then iterate for whole frames."""
    # Bounded so a corrupt stream cannot make the node allocate without limit.
    return msgpack.Unpacker(raw=False, max_buffer_size=256 * 1024 * 1024, strict_map_key=False)
