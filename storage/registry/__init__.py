"""Registry client: pull and push models over the Docker/OCI distribution protocol.

Storage never speaks HTTP itself: every request goes through an injected
:class:`omx.protocols.RegistryTransport` (the httpx implementation lives in
``omx.runtime.registry_http``). Progress is reported as frozen events whose
:meth:`to_ollama` form is exactly what Ollama's ``/api/pull`` and
``/api/push`` stream.
"""

from __future__ import annotations

from .auth import Authenticator, Challenge, Credentials, parse_challenge
from .client import RegistryClient, RegistryOptions
from .download import Part, plan_parts
from .events import LayerProgress, ProgressEvent, Status
from .pending import PendingPull, PendingPulls
from .urls import RegistryEndpoint

__all__ = [
    "Authenticator",
    "Challenge",
    "Credentials",
    "LayerProgress",
    "Part",
    "PendingPull",
    "PendingPulls",
    "ProgressEvent",
    "RegistryClient",
    "RegistryEndpoint",
    "RegistryOptions",
    "Status",
    "parse_challenge",
    "plan_parts",
]
