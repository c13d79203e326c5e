"""Errors raised by the mesh layer.

They all derive from the root tree in :mod:`omx.errors`, so the runtime maps
them to HTTP statuses without knowing the mesh::

    OmxError
    ├── MeshError (500)
    │   ├── SerfRPCError          the agent answered a command with an error
    │   │   └── SerfTimeout       no answer within the call's timeout
    │   ├── SerfConnectionError   the RPC socket could not be opened or was lost
    │   └── SerfAgentError        the agent process could not be started / kept up
    ├── ConfigError
    │   └── TagsTooLarge          tags would not fit Serf's 512-byte limit
    └── InvalidRequest
        ├── InvalidJoinToken
        └── InvalidSecret
"""

from __future__ import annotations

from omx.errors import ConfigError, InvalidRequest, OmxError

__all__ = [
    "InvalidJoinToken",
    "InvalidSecret",
    "MeshError",
    "SerfAgentError",
    "SerfConnectionError",
    "SerfRPCError",
    "SerfTimeout",
    "TagsTooLarge",
]


class MeshError(OmxError):
    """Base of every failure of the membership layer."""

    status = 500


class SerfRPCError(MeshError):
    """The Serf agent answered an RPC command with an error string."""


class SerfTimeout(SerfRPCError):
    """An RPC command got no answer within its timeout."""


class SerfConnectionError(MeshError):
    """The RPC connection to the agent could not be opened, or it was lost."""


class SerfAgentError(MeshError):
    """The Serf agent process could not be started or exited unexpectedly."""


class TagsTooLarge(ConfigError):
    """The encoded tags exceed Serf's 512-byte member metadata limit."""


class InvalidJoinToken(InvalidRequest):
    """A join token could not be parsed."""


class InvalidSecret(InvalidRequest):
    """A cluster secret file or value is malformed."""
