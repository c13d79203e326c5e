"""The dispatcher: the one place between the HTTP adapter and the handlers.

Authentication, metrics hooks and (later) routing of model-routed calls to
peers happen here, so built-in handlers, custom functions and in-process
callers all take the same path.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

from omx.errors import Unauthorized
from omx.functions.call import Call
from omx.functions.registry import HandlerSpec

__all__ = ["Dispatcher", "PeerVerifier"]

PeerVerifier = Callable[[Call, bytes], None]
"""Raises :class:`Unauthorized` unless the call carries a valid peer signature."""

CallObserver = Callable[[HandlerSpec, Call], None]


class Dispatcher:
    """Checks a call's credentials, then runs its handler."""

    def __init__(
        self,
        *,
        api_keys: Sequence[str] = (),
        peer_verifier: PeerVerifier | None = None,
        observers: Sequence[CallObserver] = (),
    ) -> None:
        self._api_keys = tuple(k.encode() for k in api_keys if k)
        self._peer_verifier = peer_verifier
        self._observers = list(observers)

    def add_observer(self, observer: CallObserver) -> None:
        self._observers.append(observer)

    def authorize(self, spec: HandlerSpec, call: Call, raw_body: bytes = b"") -> None:
        if spec.auth == "public":
            return
        if spec.auth == "peer":
            if self._peer_verifier is None:
                raise Unauthorized("peer endpoints need the cluster secret, and this node has none")
            self._peer_verifier(call, raw_body)
            return
        if not self._api_keys:
            return
        header = call.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.strip().encode()
        if not any(hmac.compare_digest(presented, key) for key in self._api_keys):
            raise Unauthorized("invalid API key")

    async def invoke(self, spec: HandlerSpec, body: Any, call: Call) -> Any:
        for observer in self._observers:
            observer(spec, call)
        return await spec.func(body, call)
