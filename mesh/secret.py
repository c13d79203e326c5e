"""The cluster secret and the keys derived from it.

One secret of 32 random bytes (``$OMX_HOME/cluster/secret``, mode 0600)
keys everything: HKDF-SHA256 (RFC 5869) with a distinct ``info`` label per
use derives the Serf gossip key, the peer request signing key, the local
Serf RPC token and the seed of the cluster CA's private key (so every member
builds the same CA without copying keys), so learning one derived key reveals
neither the secret nor the others.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from omx.fsutil import atomic_write
from omx.mesh.errors import InvalidSecret

__all__ = [
    "SECRET_SIZE",
    "ClusterSecret",
    "hkdf_sha256",
    "load_or_create_secret",
    "read_secret",
    "write_secret",
]

SECRET_SIZE = 32
_SALT = b"omx cluster secret v1"


def hkdf_sha256(ikm: bytes, info: bytes, length: int, salt: bytes = _SALT) -> bytes:
    """HKDF-SHA256 extract-then-expand (RFC 5869)."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"invalid HKDF output length {length}")
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


@dataclass(frozen=True, repr=False)
class ClusterSecret:
    """The 32-byte cluster secret; its ``repr`` never shows the bytes."""

    value: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes) or len(self.value) != SECRET_SIZE:
            raise InvalidSecret(f"cluster secret must be exactly {SECRET_SIZE} bytes")

    def __repr__(self) -> str:
        return f"ClusterSecret(fingerprint={self.fingerprint()})"

    @classmethod
    def generate(cls) -> ClusterSecret:
        return cls(secrets.token_bytes(SECRET_SIZE))

    @classmethod
    def from_text(cls, text: str) -> ClusterSecret:
        """Parse the base64url / base64 / hex text form (as in ``OMX_CLUSTER_SECRET``)."""
        text = text.strip()
        candidates = []
        if len(text) == 2 * SECRET_SIZE:
            with contextlib.suppress(ValueError):
                candidates.append(bytes.fromhex(text))
        with contextlib.suppress(ValueError):
            candidates.append(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        with contextlib.suppress(ValueError):
            candidates.append(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
        for raw in candidates:
            if len(raw) == SECRET_SIZE:
                return cls(raw)
        raise InvalidSecret(f"cluster secret must be {SECRET_SIZE} bytes as hex or base64")

    def to_text(self) -> str:
        """Unpadded base64url text form."""
        return base64.urlsafe_b64encode(self.value).rstrip(b"=").decode()

    def fingerprint(self) -> str:
        """A short non-secret identifier of the secret (safe to log and compare)."""
        return hkdf_sha256(self.value, b"omx fingerprint", 8).hex()

    def gossip_key(self, size: int = 32) -> str:
        """Serf's ``encrypt_key``: base64 of a 16, 24 or 32-byte AES key."""
        if size not in (16, 24, 32):
            raise ValueError("serf gossip keys are 16, 24 or 32 bytes")
        return base64.b64encode(hkdf_sha256(self.value, b"omx serf gossip key", size)).decode()

    def peer_auth_key(self) -> bytes:
        """The HMAC key for signing peer requests (see :mod:`omx.mesh.peer_auth`)."""
        return self._peer_auth_key

    @functools.cached_property
    def _peer_auth_key(self) -> bytes:  # derived once: every peer request is signed or checked with it
        return hkdf_sha256(self.value, b"omx peer auth key", 32)

    def ca_key_seed(self) -> bytes:
        """48 bytes from which the cluster CA's private key is derived (see :mod:`omx.runtime.tls`)."""
        return hkdf_sha256(self.value, b"omx cluster ca key", 48)

    def rpc_auth_token(self) -> str:
        """The token the local Serf agent demands on its RPC port."""
        return hkdf_sha256(self.value, b"omx serf rpc token", 24).hex()


def read_secret(path: Path) -> ClusterSecret:
    """Read a secret file (raw 32 bytes); refuse one readable by group or others."""
    try:
        info = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidSecret(f"cluster secret file {path} does not exist") from exc
    except OSError as exc:
        raise InvalidSecret(f"cannot read cluster secret file {path}: {exc.strerror}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidSecret(f"cluster secret file {path} is accessible to other users; chmod 600 it")
    if len(raw) != SECRET_SIZE:
        raise InvalidSecret(f"cluster secret file {path} holds {len(raw)} bytes, expected {SECRET_SIZE}")
    return ClusterSecret(raw)


def write_secret(path: Path, secret: ClusterSecret, *, overwrite: bool = False) -> None:
    """Write ``secret`` to ``path`` atomically with mode 0600 (temp + fsync + rename).

    Without ``overwrite`` an existing file is left alone and :class:`InvalidSecret` raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # Without overwrite the file is linked into place: a racing writer's secret is never clobbered.
        atomic_write(path, secret.value, mode=0o600, exclusive=not overwrite)
    except FileExistsError as exc:
        raise InvalidSecret(f"cluster secret file {path} already exists") from exc


def load_or_create_secret(path: Path) -> tuple[ClusterSecret, bool]:
    """Return ``(secret, created)``: the existing secret, or a new one written atomically."""
    if path.exists():
        return read_secret(path), False
    secret = ClusterSecret.generate()
    try:
        write_secret(path, secret)
    except InvalidSecret:
        return read_secret(path), False  # another process created it first
    return secret, True
