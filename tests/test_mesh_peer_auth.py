"""Peer request signatures: valid, wrong key, tampered, stale, replayed."""

from __future__ import annotations

import pytest

from omx.errors import Unauthorized
from omx.mesh import HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, Verifier, body_digest, sign

KEY = b"k" * 32


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_valid_request_is_accepted_once() -> None:
    clock = Clock()
    verifier = Verifier(KEY, window_s=30, clock=clock)
    headers = sign(KEY, "omx-1a2b3c4d", "post", "/peer/chunks?x=1", b"body", now=clock.now)
    assert verifier.verify("POST", "/peer/chunks?x=1", headers, b"body") == "omx-1a2b3c4d"
    with pytest.raises(Unauthorized, match="replayed"):
        verifier.verify("POST", "/peer/chunks?x=1", headers, b"body")


def test_header_names_are_case_insensitive_and_digest_may_replace_body() -> None:
    clock = Clock()
    headers = sign(KEY, "n1", "PUT", "/p", digest=body_digest(b"big"), now=clock.now)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert Verifier(KEY, clock=clock).verify("PUT", "/p", lowered, digest=body_digest(b"big")) == "n1"


@pytest.mark.parametrize("change", ["key", "method", "path", "query", "body", "node", "timestamp", "nonce"])
def test_any_change_breaks_the_signature(change: str) -> None:
    clock = Clock()
    headers = sign(KEY, "n1", "POST", "/a?q=1", b"payload", now=clock.now)
    method, path, body, key = "POST", "/a?q=1", b"payload", KEY
    if change == "key":
        key = b"w" * 32
    elif change == "method":
        method = "PUT"
    elif change == "path":
        path = "/b?q=1"
    elif change == "query":
        path = "/a?q=2"
    elif change == "body":
        body = b"payloaD"
    elif change == "node":
        headers["X-Omx-Node"] = "n2"
    elif change == "timestamp":
        headers[HEADER_TIMESTAMP] = str(int(clock.now) + 1)
    elif change == "nonce":
        headers[HEADER_NONCE] = "A" * 24
    with pytest.raises(Unauthorized, match="does not match"):
        Verifier(key, clock=clock).verify(method, path, headers, body)


def test_missing_and_malformed_headers() -> None:
    verifier = Verifier(KEY, clock=Clock())
    headers = sign(KEY, "n1", "GET", "/", now=Clock().now)
    for name in headers:
        partial = {k: v for k, v in headers.items() if k != name}
        with pytest.raises(Unauthorized, match="not signed"):
            verifier.verify("GET", "/", partial)
    with pytest.raises(Unauthorized, match="malformed"):
        verifier.verify("GET", "/", {**headers, HEADER_TIMESTAMP: "-5"})
    with pytest.raises(Unauthorized, match="malformed"):
        verifier.verify("GET", "/", {**headers, HEADER_NONCE: "short"})
    with pytest.raises(Unauthorized, match="does not match"):
        verifier.verify("GET", "/", {**headers, HEADER_SIGNATURE: "00" * 32})


def test_stale_and_future_timestamps_are_refused() -> None:
    clock = Clock()
    verifier = Verifier(KEY, window_s=30, clock=clock)
    old = sign(KEY, "n1", "GET", "/", now=clock.now - 31)
    future = sign(KEY, "n1", "GET", "/", now=clock.now + 31)
    for headers in (old, future):
        with pytest.raises(Unauthorized, match="window"):
            verifier.verify("GET", "/", headers)
    edge = sign(KEY, "n1", "GET", "/", now=clock.now - 30)
    assert verifier.verify("GET", "/", edge) == "n1"


def test_replay_cache_is_bounded_and_never_reopens_a_replay() -> None:
    clock = Clock()
    verifier = Verifier(KEY, window_s=30, clock=clock, max_nonces=3)
    first = sign(KEY, "n1", "GET", "/", now=clock.now - 10)
    verifier.verify("GET", "/", first)
    for _ in range(3):
        verifier.verify("GET", "/", sign(KEY, "n1", "GET", "/", now=clock.now))
    assert len(verifier._seen) == 3
    with pytest.raises(Unauthorized, match="replayed"):
        verifier.verify("GET", "/", first)  # its nonce was evicted, but its timestamp is below the floor
    # Once the window has passed, expired nonces are dropped and the cache has room again.
    clock.now += 31
    assert verifier.verify("GET", "/", sign(KEY, "n2", "GET", "/", now=clock.now)) == "n2"
    assert len(verifier._seen) == 1
