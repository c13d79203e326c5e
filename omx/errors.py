"""The omx exception tree.

Every error a client can see derives from :class:`OmxError` and carries the
HTTP status it maps to; the runtime turns them into ``{"error": "..."}`` in
exactly one place. Lower layers raise these; nothing catches them to re-raise
strings.

    OmxError (500)
    ├── InvalidRequest (400)
    │   ├── InvalidModelName
    │   ├── InvalidDigest
    │   └── UnsupportedCapability
    ├── Unauthorized (401)
    ├── Forbidden (403)
    ├── NotFound (404)
    │   ├── ModelNotFound
    │   └── BlobNotFound
    ├── Conflict (409)
    ├── ServiceBusy (503)
    ├── EngineError (500)
    │   └── RunnerCrashed
    ├── StoreError (500)
    │   └── IntegrityError
    ├── RegistryError (502)
    ├── PeerError (502)
    └── ConfigError (500; the CLI exits 2)
"""

from __future__ import annotations

__all__ = [
    "BlobNotFound",
    "ConfigError",
    "Conflict",
    "EngineError",
    "Forbidden",
    "IntegrityError",
    "InvalidDigest",
    "InvalidModelName",
    "InvalidRequest",
    "ModelNotFound",
    "NotFound",
    "OmxError",
    "PeerError",
    "RegistryError",
    "RunnerCrashed",
    "ServiceBusy",
    "StoreError",
    "Unauthorized",
    "UnsupportedCapability",
]


class OmxError(Exception):
    """Base of every error omx reports; ``status`` is its HTTP status code."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidRequest(OmxError):
    status = 400


class InvalidModelName(InvalidRequest):
    pass


class InvalidDigest(InvalidRequest):
    pass


class UnsupportedCapability(InvalidRequest):
    """The model cannot do what was asked (images without vision, embeddings…)."""


class Unauthorized(OmxError):
    status = 401


class Forbidden(OmxError):
    status = 403


class NotFound(OmxError):
    status = 404


class ModelNotFound(NotFound):
    def __init__(self, name: str) -> None:
        # Ollama's exact wording: clients match on it.
        super().__init__(f"model '{name}' not found")
        self.model = name


class BlobNotFound(NotFound):
    pass


class Conflict(OmxError):
    status = 409


class ServiceBusy(OmxError):
    """A bounded queue is full; the client should retry later."""

    status = 503

    def __init__(self, message: str = "server busy, please try again", *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(OmxError):
    status = 500


class RunnerCrashed(EngineError):
    pass


class StoreError(OmxError):
    status = 500


class IntegrityError(StoreError):
    pass


class RegistryError(OmxError):
    status = 502


class PeerError(OmxError):
    status = 502


class ConfigError(OmxError):
    """Invalid configuration; ``key`` names the offending setting when known."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
