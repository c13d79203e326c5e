"""The httpx implementation of :class:`omx.protocols.RegistryTransport`.

Bodies stream in both directions. Redirects are followed here, by hand, so
that a redirect to another host (a registry sending blob downloads to its
CDN) drops the ``Authorization`` header: registry credentials are never sent
to a third party. Network failures surface as :class:`ConnectionError` and
timeouts as :class:`TimeoutError`, the signals the registry client retries
on; a URL this transport cannot speak is a :class:`RegistryError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from omx.errors import RegistryError
from omx.protocols import RegistryResponse

__all__ = ["HttpxRegistryTransport"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class HttpxRegistryTransport:
    """Registry HTTP over one pooled :class:`httpx.AsyncClient` (close it with :meth:`aclose`)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        max_redirects: int = 10,
        verify: bool | str = True,
        client: httpx.AsyncClient | None = None,
        user_agent: str = "omx",
    ) -> None:
        self._client = client or httpx.AsyncClient(follow_redirects=False, verify=verify, http2=False)
        self._connect_timeout = connect_timeout
        self._max_redirects = max_redirects
        self._user_agent = user_agent

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | AsyncIterator[bytes] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the RegistryTransport protocol names it
    ) -> RegistryResponse:
        """Send one request, following redirects; ``timeout`` bounds each wait for the network."""
        sent = {"User-Agent": self._user_agent, **(headers or {})}
        limits = httpx.Timeout(timeout, connect=self._connect_timeout if timeout is None
                               else min(timeout, self._connect_timeout))
        origin = urlsplit(url).netloc
        for _ in range(self._max_redirects + 1):
            response = await self._send(method, url, sent, body, limits)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return _wrap(response, url)
            await response.aclose()
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin:
                sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
            if response.status_code == 303 or (response.status_code in (301, 302) and method not in ("GET", "HEAD")):
                method, body = "GET", None
                sent = {k: v for k, v in sent.items() if k.lower() not in ("content-length", "content-type")}
            elif body is not None and not isinstance(body, bytes):
                raise RegistryError(f"the registry redirected an upload to {url}; streamed bodies cannot follow")
        raise RegistryError(f"too many redirects fetching {url}")

    async def _send(
        self, method: str, url: str, headers: dict[str, str], body: Any, limits: httpx.Timeout
    ) -> httpx.Response:
        try:
            request = self._client.build_request(method, url, headers=headers, content=body, timeout=limits)
            return await self._client.send(request, stream=True)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise RegistryError(f"cannot fetch {url}: {e}") from e
        except httpx.TimeoutException as e:
            raise TimeoutError(f"{url}: {type(e).__name__}") from e
        except httpx.TransportError as e:
            raise ConnectionError(f"{url}: {e or type(e).__name__}") from e


def _wrap(response: httpx.Response, url: str) -> RegistryResponse:
    headers: dict[str, str] = {}
    for key, value in response.headers.multi_items():
        k = key.lower()
        headers[k] = f"{headers[k]}, {value}" if k in headers else value
    return RegistryResponse(response.status_code, headers, _Body(response), str(response.url) or url)


class _Body:
    """A response body as an async iterator; :meth:`aclose` releases the connection even unread."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._pieces: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._pieces is None:
            self._pieces = self._response.aiter_bytes()
        try:
            return await self._pieces.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except httpx.TimeoutException as e:
            await self.aclose()
            raise TimeoutError(f"{self._response.url}: {type(e).__name__}") from e
        except httpx.TransportError as e:
            await self.aclose()
            raise ConnectionError(f"{self._response.url}: {e or type(e).__name__}") from e

    async def aclose(self) -> None:
        await self._response.aclose()
