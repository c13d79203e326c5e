"""The dispatcher: the one place between the HTTP adapter and the handlers.

Authentication, metrics hooks and (later) routing of model-routed calls to
peers happen here, so built-in handlers, custom functions and in-process
callers all take the same path.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omx.errors import Forbidden, Unauthorized
from omx.functions.call import Call
from omx.functions.registry import HandlerSpec
from omx.mesh.peer_auth import Verifier

__all__ = ["CallObserver", "Dispatcher", "PeerVerifier", "RequestDone", "RequestObserver", "peer_verifier"]

PeerVerifier = Callable[[Call, bytes], None]
"""Raises :class:`Unauthorized` unless the call carries a valid peer signature."""

CallObserver = Callable[[HandlerSpec, Call], None]


@dataclass(frozen=True)
class RequestDone:
    """One finished request: handler name, HTTP status and seconds from arrival to the last byte."""

    handler: str
    status: int
    seconds: float


RequestObserver = Callable[[RequestDone], None]


def peer_verifier(verifier: Verifier) -> PeerVerifier:
    """A :data:`PeerVerifier` checking HMAC signatures with ``verifier`` (its replay cache included)."""

    def check(call: Call, raw_body: bytes) -> None:
        node = verifier.verify(call.method, call.path or call.spec.path, call.headers, raw_body)
        call.peer = node

    return check


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


class Dispatcher:
    """Checks a call's credentials, then runs its handler; counts requests in flight."""

    def __init__(
        self,
        *,
        api_keys: Sequence[str] = (),
        peer_verifier: PeerVerifier | None = None,
        observers: Sequence[CallObserver] = (),
    ) -> None:
        self._api_keys = tuple(k.encode() for k in api_keys if k)
        self.peer_verifier = peer_verifier
        self._observers = list(observers)
        self._done_observers: list[RequestObserver] = []
        self.in_flight = 0

    @property
    def api_keys_required(self) -> bool:
        return bool(self._api_keys)

    def add_observer(self, observer: CallObserver) -> None:
        self._observers.append(observer)

    def add_request_observer(self, observer: RequestObserver) -> None:
        """Call ``observer`` once per finished request (the adapter reports them)."""
        self._done_observers.append(observer)

    def authorize(self, spec: HandlerSpec, call: Call, raw_body: bytes = b"") -> None:
        if spec.auth == "public":
            return
        if spec.auth == "peer":
            if self.peer_verifier is None:
                raise Unauthorized("peer endpoints need the cluster secret, and this node has none")
            self.peer_verifier(call, raw_body)
            return
        if not self._api_keys:
            if spec.auth == "admin" and not _loopback(call.client):
                raise Forbidden("cluster administration is only allowed from this machine "
                                "unless API keys are configured (security.api_keys)")
            return
        header = call.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.strip().encode()
        if not any(hmac.compare_digest(presented, key) for key in self._api_keys):
            raise Unauthorized("invalid API key")

    def started(self) -> None:
        """The adapter took a request in."""
        self.in_flight += 1

    def finished(self, handler: str, status: int, seconds: float) -> None:
        """The adapter sent a request's last byte (or gave up on it)."""
        self.in_flight = max(0, self.in_flight - 1)
        done = RequestDone(handler, status, seconds)
        for observer in self._done_observers:
            observer(done)

    async def invoke(self, spec: HandlerSpec, body: Any, call: Call) -> Any:
        for observer in self._observers:
            observer(spec, call)
        return await spec.func(body, call)
