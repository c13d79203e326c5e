"""Small pieces of the HTTP/3 server (:mod:`omx.runtime.quic_server`): Retry tokens, file stamps."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from typing import Any

__all__ = ["RetryTokens", "files_stamp"]


class RetryTokens:
    """Retry tokens: the connection ids a handshake continues with, sealed to the client's address and
    time with an HMAC under a key of this process (qh3's own handler makes an RSA key, about 0.2 s)."""

    lifetime = 10.0
    """Seconds a token is good for (a client sends it straight back)."""

    def __init__(self) -> None:
        self._key = os.urandom(32)

    def _mac(self, address: Any, body: bytes) -> bytes:
        return hmac.new(self._key, f"{address[0]}|{address[1]}|".encode() + body, hashlib.sha256).digest()

    def create_token(self, address: Any, original_cid: bytes, retry_cid: bytes) -> bytes:
        body = struct.pack("!dB", time.time(), len(original_cid)) + original_cid + retry_cid
        return body + self._mac(address, body)

    def validate_token(self, address: Any, token: bytes) -> tuple[bytes, bytes]:
        """(original destination connection id, retry source connection id); ValueError for a bad token."""
        body, mac = token[:-32], token[-32:]
        if len(body) < 9 or not hmac.compare_digest(mac, self._mac(address, body)):
            raise ValueError("not a retry token of this server for this address")
        made, length = struct.unpack_from("!dB", body)
        if not 0 <= time.time() - made <= self.lifetime:
            raise ValueError("the retry token has expired")
        return body[9:9 + length], body[9 + length:]


def files_stamp(*paths: str) -> tuple[tuple[int, int, int], ...]:
    """Identity of files (inode, size, mtime): they are replaced by rename, so a new file shows."""
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)
