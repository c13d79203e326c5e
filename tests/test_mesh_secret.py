"""Cluster secret, key derivation and join tokens."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from omx.errors import InvalidRequest
from omx.mesh import (
    ClusterSecret,
    InvalidJoinToken,
    InvalidSecret,
    JoinToken,
    hkdf_sha256,
    load_or_create_secret,
    read_secret,
    write_secret,
)


def test_hkdf_matches_rfc5869_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, info, 42, salt=salt)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_secret_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "cluster" / "secret"
    secret, created = load_or_create_secret(path)
    assert created and len(path.read_bytes()) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_or_create_secret(path)
    assert not created_again and again == secret
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temp files left
    with pytest.raises(InvalidSecret, match="already exists"):
        write_secret(path, ClusterSecret.generate())
    write_secret(path, ClusterSecret(b"\x01" * 32), overwrite=True)
    assert read_secret(path).value == b"\x01" * 32


def test_bad_secret_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with pytest.raises(InvalidSecret, match="does not exist"):
        read_secret(path)
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(InvalidSecret, match="5 bytes"):
        read_secret(path)
    path.write_bytes(bytes(32))
    os.chmod(path, 0o644)
    with pytest.raises(InvalidSecret, match="chmod 600"):
        read_secret(path)
    assert issubclass(InvalidSecret, InvalidRequest)


def test_derived_keys_are_distinct_and_stable() -> None:
    secret = ClusterSecret(bytes(range(32)))
    gossip = base64.b64decode(secret.gossip_key())
    assert len(gossip) == 32 and len(base64.b64decode(secret.gossip_key(16))) == 16
    keys = {gossip, secret.peer_auth_key(), bytes.fromhex(secret.rpc_auth_token()), secret.value}
    assert len(keys) == 4
    assert secret.gossip_key() == ClusterSecret(bytes(range(32))).gossip_key()
    assert ClusterSecret(bytes(32)).gossip_key() != secret.gossip_key()
    assert secret.value.hex() not in repr(secret)
    with pytest.raises(ValueError):
        secret.gossip_key(20)


def test_secret_text_forms() -> None:
    secret = ClusterSecret.generate()
    for text in (secret.to_text(), secret.value.hex(), base64.b64encode(secret.value).decode()):
        assert ClusterSecret.from_text(text) == secret
    with pytest.raises(InvalidSecret):
        ClusterSecret.from_text("abc")
    with pytest.raises(InvalidSecret):
        ClusterSecret(b"x" * 31)


def test_join_token_round_trip() -> None:
    secret = ClusterSecret.generate()
    fingerprint = hashlib.sha256(b"ca").hexdigest()
    token = JoinToken(seeds=("10.0.0.1:4001", "[fd00::1]:4001"), secret=secret, ca_fingerprint=fingerprint)
    text = token.encode()
    assert text.startswith("omx1.") and "=" not in text and "+" not in text and "/" not in text
    parsed = JoinToken.parse(text)
    assert parsed.seeds == token.seeds and parsed.secret == secret and parsed.ca_fingerprint == fingerprint
    assert JoinToken.parse(JoinToken(("h.example:1",), secret).encode()).ca_fingerprint is None
    assert secret.to_text() not in repr(parsed)


def _raw_token(body: bytes) -> str:
    return "omx1." + base64.urlsafe_b64encode(body).rstrip(b"=").decode()


@pytest.mark.parametrize(("text", "message"), [
    ("hello", "not an omx join token"),
    ("omx9.abcd", "unsupported join token version"),
    ("omx1.!!!!", "corrupted"),
    (_raw_token(b"[1]"), "not an object"),
    (_raw_token(b'{"v":2,"seeds":["a:1"],"secret":"x"}'), "version 2"),
    (_raw_token(b'{"v":1,"seeds":"a:1","secret":"x"}'), "list of host:port"),
    (_raw_token(b'{"v":1,"seeds":["a:1"]}'), "no cluster secret"),
    (_raw_token(b'{"v":1,"seeds":["a:1"],"secret":"AAAA"}'), "secret is invalid"),
    (_raw_token(b'{"v":1,"seeds":[],"secret":"' + b"A" * 43 + b'"}'), "at least one seed"),
    (_raw_token(b'{"v":1,"seeds":["nope"],"secret":"' + b"A" * 43 + b'"}'), "not host:port"),
    (_raw_token(b'{"v":1,"seeds":["a:1"],"secret":"' + b"A" * 43 + b'","ca":"zz"}'), "fingerprint"),
])
def test_join_token_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(InvalidJoinToken, match=message):
        JoinToken.parse(text)
