"""Join tokens: how a new node learns where the cluster is and its secret.

Format: ``omx1.`` followed by unpadded base64url of compact JSON
``{"v": 1, "seeds": ["host:port", ...], "secret": "<base64url>", "ca": "<hex>"|null}``.
The prefix makes a token recognisable and versioned; the JSON inside carries
the version again so parsing can explain a mismatch.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from omx.errors import ConfigError
from omx.mesh.errors import InvalidJoinToken, InvalidSecret
from omx.mesh.secret import ClusterSecret
from omx.mesh.tags import split_host_port

__all__ = ["TOKEN_PREFIX", "TOKEN_VERSION", "JoinToken"]

TOKEN_VERSION = 1
TOKEN_PREFIX = "omx1."
_MAX_SEEDS = 32
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, repr=False)
class JoinToken:
    """Seeds to join through, the cluster secret and an optional CA fingerprint (sha256 hex)."""

    seeds: tuple[str, ...]
    secret: ClusterSecret
    ca_fingerprint: str | None = None
    version: int = TOKEN_VERSION

    def __post_init__(self) -> None:
        if not self.seeds:
            raise InvalidJoinToken("join token needs at least one seed address")
        if len(self.seeds) > _MAX_SEEDS:
            raise InvalidJoinToken(f"join token holds more than {_MAX_SEEDS} seed addresses")
        for seed in self.seeds:
            try:
                split_host_port(seed)
            except ConfigError as exc:
                raise InvalidJoinToken(f"join token seed {seed!r} is not host:port ({exc})") from exc
        if self.ca_fingerprint is not None and not _FINGERPRINT_RE.match(self.ca_fingerprint):
            raise InvalidJoinToken("join token CA fingerprint must be 64 lowercase hex digits")

    def __repr__(self) -> str:
        return (f"JoinToken(seeds={self.seeds!r}, secret={self.secret!r}, "
                f"ca_fingerprint={self.ca_fingerprint!r})")

    def encode(self) -> str:
        """The token text to hand to a joining node (it contains the secret)."""
        body = {"v": self.version, "seeds": list(self.seeds), "secret": self.secret.to_text(),
                "ca": self.ca_fingerprint}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Parse a token; every problem raises :class:`InvalidJoinToken` saying what is wrong."""
        text = text.strip()
        if not text.startswith("omx") or "." not in text:
            raise InvalidJoinToken("not an omx join token (expected it to start with 'omx1.')")
        if not text.startswith(TOKEN_PREFIX):
            raise InvalidJoinToken(
                f"unsupported join token version {text.split('.', 1)[0]!r}; this node reads {TOKEN_PREFIX!r}")
        payload = text[len(TOKEN_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            body: Any = json.loads(raw)
        except (binascii.Error, ValueError) as exc:
            raise InvalidJoinToken("join token is corrupted (bad base64url or JSON); copy it again") from exc
        if not isinstance(body, dict):
            raise InvalidJoinToken("join token is corrupted (payload is not an object)")
        if body.get("v") != TOKEN_VERSION:
            raise InvalidJoinToken(f"join token declares version {body.get('v')!r}, expected {TOKEN_VERSION}")
        seeds, secret_text, ca = body.get("seeds"), body.get("secret"), body.get("ca")
        if not isinstance(seeds, list) or not all(isinstance(s, str) for s in seeds):
            raise InvalidJoinToken("join token seeds must be a list of host:port strings")
        if not isinstance(secret_text, str):
            raise InvalidJoinToken("join token carries no cluster secret")
        if ca is not None and not isinstance(ca, str):
            raise InvalidJoinToken("join token CA fingerprint must be a string")
        try:
            secret = ClusterSecret.from_text(secret_text)
        except InvalidSecret as exc:
            raise InvalidJoinToken(f"join token secret is invalid: {exc}") from exc
        return cls(seeds=tuple(seeds), secret=secret, ca_fingerprint=ca)
