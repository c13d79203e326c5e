"""Registry authentication: HTTP basic, and the bearer-token challenge flow.

A registry that wants a token answers ``401`` with::

    WWW-Authenticate: Bearer realm="https://auth.example/token",service="registry",scope="repository:ns/m:pull"

The client then asks the realm for a token (``GET realm?service=…&scope=…``,
with basic credentials when it has them) and repeats the request with
``Authorization: Bearer <token>``. Tokens are cached per host and scope.
Ollama's own key-signed registry auth is not supported.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from omx.errors import RegistryError, Unauthorized
from omx.protocols import RegistryResponse, RegistryTransport

from ._io import header, read_body

__all__ = ["Authenticator", "Challenge", "Credentials", "parse_challenge"]

_PARAM_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')
_MAX_TOKEN_BODY = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge:
    """Parse ``Scheme k="v",k2=v2``; the scheme is lower-cased."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


class Authenticator:
    """Sends registry requests, answering auth challenges once per request."""

    def __init__(self, transport: RegistryTransport, credentials: Credentials | None = None) -> None:
        self.transport = transport
        self.credentials = credentials
        self._tokens: dict[tuple[str, str], str] = {}
        self._basic_hosts: set[str] = set()

    def _auth_header(self, url: str, scope: str) -> str | None:
        host = urlsplit(url).netloc
        token = self._tokens.get((host, scope))
        if token is not None:
            return f"Bearer {token}"
        if host in self._basic_hosts and self.credentials is not None:
            return self.credentials.basic_header()
        return None

    async def request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: bytes | AsyncIterator[bytes] | None = None,
        request_timeout: float | None = None,
        retry_auth: bool = True,
    ) -> RegistryResponse:
        """One request; on a ``401`` challenge, authenticate and repeat it once.

        Streamed bodies cannot be repeated: callers authenticate with a
        body-less request first (e.g. the upload ``POST``).
        """
        sent = dict(headers or {})
        auth = self._auth_header(url, scope)
        if auth is not None:
            sent["Authorization"] = auth
        response = await self.transport.request(method, url, headers=sent, body=body, timeout=request_timeout)
        if response.status != 401 or not retry_auth:
            return response
        await read_body(response, limit=_MAX_TOKEN_BODY)
        challenge = parse_challenge(header(response, "www-authenticate"))
        await self.authenticate(url, scope, challenge, request_timeout=request_timeout)
        return await self.request(method, url, scope=scope, headers=headers, body=body,
                                  request_timeout=request_timeout, retry_auth=False)

    async def authenticate(
        self, url: str, scope: str, challenge: Challenge, *, request_timeout: float | None
    ) -> None:
        host = urlsplit(url).netloc
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise Unauthorized(f"registry {host} requires a username and password")
            self._basic_hosts.add(host)
            return
        if challenge.scheme != "bearer" or not challenge.realm:
            raise Unauthorized(f"registry {host} asks for unsupported authentication {challenge.scheme!r}")
        self._tokens[(host, scope)] = await self._fetch_token(challenge, scope, request_timeout=request_timeout)

    async def _fetch_token(self, challenge: Challenge, scope: str, *, request_timeout: float | None) -> str:
        query = {"scope": challenge.params.get("scope") or scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        realm = challenge.realm
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic_header()
        response = await self.transport.request("GET", url, headers=headers, timeout=request_timeout)
        data = await read_body(response, limit=_MAX_TOKEN_BODY)
        if response.status in (401, 403):
            raise Unauthorized(f"the token service {urlsplit(realm).netloc} refused the credentials")
        if response.status != 200:
            raise RegistryError(f"token service {realm} answered {response.status}")
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError) as e:
            raise RegistryError(f"token service {realm} sent an invalid answer") from e
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service {realm} sent no token")
        return token
