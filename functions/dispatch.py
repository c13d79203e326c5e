"""The dispatcher: the one place between the HTTP adapter and the handlers.

Authentication, metrics hooks and routing of model-routed calls to peers
(:class:`~omx.functions.router.Router`) happen here, so built-in handlers,
custom functions and in-process callers all take the same path.

Authorization comes in two steps so that a node never reads a body for a
caller it will refuse: :meth:`Dispatcher.precheck` needs only the request
line and headers (it is complete for API-key and admin handlers), and peer
handlers finish with :meth:`Dispatcher.authorize` once the body's sha256 is
known (the adapter hashes while it reads). A hop request (a call a peer
forwarded, marked ``X-Omx-Hop``) to a ``hop`` handler is authenticated the same
way as a peer handler: by the peer signature, never by an API key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from omx.errors import Forbidden, Unauthorized
from omx.functions.call import Call
from omx.functions.forwarded import client_address, is_loopback, parse_networks
from omx.functions.registry import HandlerSpec
from omx.functions.router import HOP_HEADER, Router
from omx.mesh.peer_auth import Verifier

__all__ = [
    "EMPTY_BODY_DIGEST",
    "CallObserver",
    "Dispatcher",
    "PeerVerifier",
    "RequestDone",
    "RequestObserver",
    "peer_verifier",
]

EMPTY_BODY_DIGEST = hashlib.sha256(b"").hexdigest()


class PeerVerifier(Protocol):
    """Checks peer signatures; both methods raise :class:`Unauthorized`."""

    def precheck(self, call: Call) -> None:
        """Refuse a call whose signature headers are missing, malformed or stale (no body needed)."""

    def verify(self, call: Call, body_digest: str) -> None:
        """Check the signature over the body's sha256 hex digest; sets ``call.peer``."""


CallObserver = Callable[[HandlerSpec, Call], None]


@dataclass(frozen=True)
class RequestDone:
    """One finished request: handler name, HTTP status and seconds from arrival to the last byte."""

    handler: str
    status: int
    seconds: float


RequestObserver = Callable[[RequestDone], None]


class _SignedPeers:
    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def precheck(self, call: Call) -> None:
        self._verifier.precheck(call.headers)

    def verify(self, call: Call, body_digest: str) -> None:
        call.peer = self._verifier.verify(call.method, call.path or call.spec.path, call.headers,
                                          digest=body_digest)


def peer_verifier(verifier: Verifier) -> PeerVerifier:
    """A :class:`PeerVerifier` checking HMAC signatures with ``verifier`` (its replay cache included)."""
    return _SignedPeers(verifier)


def _keys(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(k.encode() for k in keys if k)


def _matches(presented: bytes, keys: tuple[bytes, ...]) -> bool:
    found = False
    for key in keys:  # compare with every key: the time taken does not tell which one matched
        found |= hmac.compare_digest(presented, key)
    return found


class Dispatcher:
    """Checks a call's credentials, then runs its handler; counts requests in flight.

    ``admin_keys`` are API keys that may also administer the cluster (``admin``
    handlers); when no key of either kind is configured, ``admin`` handlers
    answer loopback clients only. ``trusted_proxies`` (IPs or CIDR networks)
    are the reverse proxies whose ``X-Forwarded-For`` names the real client.
    """

    def __init__(
        self,
        *,
        api_keys: Sequence[str] = (),
        admin_keys: Sequence[str] = (),
        trusted_proxies: Sequence[str] = (),
        peer_verifier: PeerVerifier | None = None,
        observers: Sequence[CallObserver] = (),
    ) -> None:
        self._admin_keys = _keys(admin_keys)
        self._api_keys = tuple(dict.fromkeys(_keys(api_keys) + self._admin_keys))
        self._proxies = parse_networks(trusted_proxies)
        self.peer_verifier = peer_verifier
        self._observers = list(observers)
        self._done_observers: list[RequestObserver] = []
        self.in_flight = 0
        self.router: Router | None = None
        """Set by a node in a cluster: model-routed calls go through it."""

    @property
    def api_keys_required(self) -> bool:
        return bool(self._api_keys)

    def add_observer(self, observer: CallObserver) -> None:
        self._observers.append(observer)

    def add_request_observer(self, observer: RequestObserver) -> None:
        """Call ``observer`` once per finished request (the adapter reports them)."""
        self._done_observers.append(observer)

    def client_address(self, direct: str | None, forwarded_for: Sequence[str] = ()) -> str | None:
        """The client a request acts for: ``X-Forwarded-For`` counts only from a trusted proxy."""
        return client_address(direct, forwarded_for, self._proxies)

    def precheck(self, spec: HandlerSpec, call: Call) -> None:
        """Every check that needs only the request line and headers, run before any body byte is read.

        Complete for every kind but ``peer`` and hop requests (``call.hop``, set
        here), whose signature covers the body: call :meth:`authorize` with the
        body's digest once it is read.
        """
        call.hop = spec.hop and HOP_HEADER.lower() in call.headers
        if spec.auth == "peer" or call.hop:
            self._peers().precheck(call)
        else:
            self.authorize(spec, call)

    def authorize(self, spec: HandlerSpec, call: Call, body_digest: str = EMPTY_BODY_DIGEST) -> None:
        """Raise :class:`Unauthorized` / :class:`Forbidden` unless the call may run ``spec``."""
        if spec.auth == "peer" or call.hop:
            self._peers().verify(call, body_digest)
            return
        if spec.auth == "public":
            return
        if not self._api_keys:
            if spec.auth == "admin" and not is_loopback(call.client):
                raise Forbidden("cluster administration is only allowed from this machine "
                                "unless admin keys are configured (security.admin_keys)")
            return
        header = call.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.strip().encode()
        if not _matches(presented, self._api_keys):
            raise Unauthorized("invalid API key")
        if spec.auth == "admin" and not _matches(presented, self._admin_keys):
            raise Forbidden("cluster administration needs an admin key (security.admin_keys); "
                            "this API key is not one")

    def _peers(self) -> PeerVerifier:
        if self.peer_verifier is None:
            raise Unauthorized("peer endpoints need the cluster secret, and this node has none")
        return self.peer_verifier

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
        if spec.model_routed and self.router is not None:
            return await self.router.serve(spec, body, call)
        return await spec.func(body, call)
