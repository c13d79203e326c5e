"""HMAC-SHA256 signatures on peer-to-peer HTTP requests (pure, no framework).

The signed string binds the method, the path with its query, the sending
node, a timestamp, a random nonce and the sha256 of the body::

    OMX-HMAC-SHA256\\n<METHOD>\\n<path?query>\\n<node>\\n<timestamp>\\n<nonce>\\n<body sha256 hex>

The receiver recomputes it with the shared peer key, accepts timestamps only
within ``window_s`` of its own clock, and remembers nonces for that window so
a captured request cannot be replayed. The secret never travels.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from omx.errors import Unauthorized

__all__ = [
    "HEADER_NODE",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "Verifier",
    "body_digest",
    "sign",
    "string_to_sign",
]

HEADER_NODE = "X-Omx-Node"
HEADER_TIMESTAMP = "X-Omx-Timestamp"
HEADER_NONCE = "X-Omx-Nonce"
HEADER_SIGNATURE = "X-Omx-Signature"
_SCHEME = "OMX-HMAC-SHA256"
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


def body_digest(body: bytes) -> str:
    """sha256 hex of a request body (pass it instead of the body for streamed uploads)."""
    return hashlib.sha256(body).hexdigest()


def string_to_sign(method: str, path: str, node: str, timestamp: str, nonce: str, digest: str) -> bytes:
    """The exact bytes both sides MAC."""
    return "\n".join((_SCHEME, method.upper(), path, node, timestamp, nonce, digest)).encode()


def _mac(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, node: str, method: str, path: str, body: bytes = b"", *,
         now: float | None = None, nonce: str | None = None, digest: str | None = None) -> dict[str, str]:
    """Headers authenticating one request from ``node``; ``path`` includes the query string."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_urlsafe(18)
    digest = digest or (body_digest(body) if body else _EMPTY_DIGEST)
    signature = _mac(key, string_to_sign(method, path, node, timestamp, nonce, digest))
    return {HEADER_NODE: node, HEADER_TIMESTAMP: timestamp, HEADER_NONCE: nonce, HEADER_SIGNATURE: signature}


class Verifier:
    """Checks peer signatures; holds the replay cache, so use one per node.

    ``verify`` returns the authenticated node name or raises
    :class:`omx.errors.Unauthorized`. The nonce cache keeps at most
    ``max_nonces`` entries: when full, the oldest are evicted and any request
    not newer than the evicted ones is refused, so eviction never re-opens a
    replay.
    """

    def __init__(self, key: bytes, window_s: float = 30.0, clock: Callable[[], float] = time.time,
                 max_nonces: int = 100_000) -> None:
        self._key = key
        self.window_s = window_s
        self._clock = clock
        self._max = max_nonces
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._floor = -1  # timestamps <= floor may have had their nonce evicted

    def precheck(self, headers: Mapping[str, str]) -> None:
        """Refuse a request whose signature headers are missing, malformed or stale.

        Needs no body: a receiver runs it before reading one, then :meth:`verify`.
        """
        self._headers(headers)

    def _headers(self, headers: Mapping[str, str]) -> tuple[str, str, str, str, float]:
        lower = {k.lower(): v for k, v in headers.items()}
        node = lower.get(HEADER_NODE.lower())
        ts_text = lower.get(HEADER_TIMESTAMP.lower())
        nonce = lower.get(HEADER_NONCE.lower())
        signature = lower.get(HEADER_SIGNATURE.lower())
        if not node or not ts_text or not nonce or not signature:
            raise Unauthorized("peer request is not signed")
        if not _NODE_RE.match(node) or not _NONCE_RE.match(nonce) or not ts_text.isdigit():
            raise Unauthorized("peer request signature headers are malformed")
        now = self._clock()
        if abs(now - int(ts_text)) > self.window_s:
            raise Unauthorized("peer request timestamp is outside the allowed window (check clocks)")
        return node, ts_text, nonce, signature, now

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes = b"", *,
               digest: str | None = None) -> str:
        """Authenticate a request; ``headers`` may be any case-insensitive or plain mapping.

        ``digest`` (:func:`body_digest` of the body, computed while it was read)
        replaces ``body``.
        """
        node, ts_text, nonce, signature, now = self._headers(headers)
        timestamp = int(ts_text)
        digest = digest or (body_digest(body) if body else _EMPTY_DIGEST)
        expected = _mac(self._key, string_to_sign(method, path, node, ts_text, nonce, digest))
        if not hmac.compare_digest(expected, signature.lower()):
            raise Unauthorized("peer request signature does not match")
        self._remember(node, nonce, timestamp, now)
        return node

    def _remember(self, node: str, nonce: str, timestamp: int, now: float) -> None:
        horizon = now - self.window_s
        while self._seen:
            oldest_key, oldest_ts = next(iter(self._seen.items()))
            if oldest_ts >= horizon:
                break
            del self._seen[oldest_key]
        if timestamp <= self._floor:
            raise Unauthorized("peer request was replayed or is too old to check")
        if (node, nonce) in self._seen:
            raise Unauthorized("peer request was replayed")
        while len(self._seen) >= self._max:
            _, evicted_ts = self._seen.popitem(last=False)
            self._floor = max(self._floor, evicted_ts)
        self._seen[(node, nonce)] = timestamp
