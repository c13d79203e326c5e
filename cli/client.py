"""Finding a node and talking to it over the Ollama HTTP API.

Discovery order: ``--host`` / ``OMX_HOST`` -> ``$OMX_HOME/run/node.json`` (written by
``omx start``; ignored when its pid is gone) -> the config's ``api.host``/``api.port``.
With ``--http3`` the client speaks HTTP/3 over QUIC to ``https://host:H3PORT``
(the port from ``node.json`` for a discovered node, else the URL's own), trusting
only the cluster CA: ``--ca FILE``, else ``$OMX_HOME/tls/ca.crt``.
Every failure leaves the CLI as one clear line on stderr: a node that does not
answer, an API error (``{"error": ...}`` -> ``Error: <message>``), or bad config
(exit 2). Nothing here prints a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import click
import httpx

from omx.errors import ConfigError
from omx.runtime.config import load_settings, omx_home

__all__ = [
    "CliFailure",
    "NodeClient",
    "api_error",
    "auth_headers",
    "ca_file",
    "config_failure",
    "discover_url",
    "node_file",
    "normalize_url",
    "read_node_file",
]

DEFAULT_PORT = 8080


class CliFailure(click.ClickException):
    """An error shown as exactly one line on stderr, with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self._exit_code = exit_code

    # click declares ``exit_code`` a class constant but reads it from the raised
    # instance: a property gives each failure its own code.
    @property
    def exit_code(self) -> int:
        return self._exit_code

    @exit_code.setter
    def exit_code(self, value: int) -> None:
        self._exit_code = value

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.format_message(), err=True)


def config_failure(exc: ConfigError) -> CliFailure:
    """Bad configuration exits 2; the message names the key when it is known."""
    return CliFailure(f"Error: {exc.message}", exit_code=2)


def api_error(message: str) -> CliFailure:
    return CliFailure(f"Error: {message}", exit_code=1)


def normalize_url(value: str, default_port: int = DEFAULT_PORT, *, scheme_ports: bool = False) -> str:
    """``host``, ``host:port`` or a URL -> ``scheme://host:port``; a wildcard bind becomes loopback.

    With ``scheme_ports`` a URL without a port takes its scheme's (80 or 443), as
    Ollama reads ``OLLAMA_HOST``; otherwise ``default_port``. A path is dropped.
    """
    text = value.strip().rstrip("/")
    scheme, port = "http", default_port
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme_ports:
            port = 443 if scheme == "https" else 80
    text = text.split("/", 1)[0]
    host, port = split_host_port(text, port) if text else ("", port)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise CliFailure(f"Error: invalid port in address {text!r}", exit_code=2)
    return host, int(port_text)


def node_file() -> Path:
    """Where a running node describes itself."""
    return omx_home() / "run" / "node.json"


def read_node_file() -> dict[str, Any] | None:
    """The running node's ``node.json``, or None when absent or unreadable."""
    try:
        data = json.loads(node_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def discover_url(host: str | None, config_file: Path | None = None, *, http3: bool = False) -> str:
    """The base URL of the node this CLI call should talk to (``https://`` and its HTTP/3 port with ``http3``)."""
    if host:
        return _h3_url(normalize_url(host), None) if http3 else normalize_url(host)
    info = read_node_file()
    if info and isinstance(info.get("url"), str):
        pid = info.get("pid")
        if not isinstance(pid, int) or pid_alive(pid):
            url = normalize_url(info["url"])
            if http3:
                h3_port = info.get("h3_port")
                if h3_port is None:
                    raise CliFailure(f"Error: the node at {url} does not serve HTTP/3 (api.http3 is off)")
                return _h3_url(url, h3_port if isinstance(h3_port, int) else None)
            return url
    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        raise config_failure(exc) from exc
    url = normalize_url(f"{_bracket(settings.api.host)}:{settings.api.port}")
    return _h3_url(url, settings.api.h3_port or None) if http3 else url


def _h3_url(url: str, port: int | None) -> str:
    """``http://host:port`` -> ``https://host:port`` (or ``port`` when given): where HTTP/3 answers."""
    rest = url.partition("://")[2]
    if port is not None:
        rest = f"{rest.rsplit(':', 1)[0]}:{port}"
    return f"https://{rest}"


def ca_file(explicit: str | Path | None) -> Path:
    """The CA an HTTP/3 client trusts: ``--ca FILE``, else ``$OMX_HOME/tls/ca.crt``; fails clearly if absent."""
    path = Path(explicit).expanduser() if explicit else omx_home() / "tls" / "ca.crt"
    if not path.is_file():
        raise CliFailure(f"Error: no cluster CA certificate at {path}: pass --ca FILE "
                         "(print it on a member with 'omx cluster ca')", exit_code=2)
    return path


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def auth_headers() -> dict[str, str]:
    """``Authorization`` for nodes with ``security.api_keys`` set: the key comes from ``OMX_API_KEY``."""
    key = os.environ.get("OMX_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class NodeClient:
    """A thin synchronous Ollama API client that turns every failure into a :class:`CliFailure`."""

    url: str
    timeout: float = 30.0
    ca: Path | None = None
    """Set: speak HTTP/3 (``url`` is ``https://``), trusting only this CA certificate."""

    def __post_init__(self) -> None:
        # Streams may idle for a long time while a model loads: no read timeout on them.
        transport: httpx.BaseTransport | None = None
        if self.ca is not None:
            from omx.runtime.http3 import Http3Transport

            transport = Http3Transport(self.ca)
        self._http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(self.timeout, connect=5.0), follow_redirects=False,
            headers=auth_headers(), transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unreachable(self) -> NoReturn:
        if self.ca is not None:
            raise CliFailure(f"omx: no HTTP/3 answer from {self.url} that verifies against {self.ca} "
                             "(is a node serving HTTP/3 there, is UDP let through, is it this cluster's CA?)")
        raise CliFailure(f"omx: no node is running at {self.url} (start one with 'omx start')")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError:
            self.unreachable()
        except httpx.ConnectTimeout:
            self.unreachable()
        except httpx.TimeoutException as exc:
            raise api_error(f"the node at {self.url} did not answer in time ({type(exc).__name__})") from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise api_error(f"connection to {self.url} lost: {exc or type(exc).__name__}") from exc

    def request(self, method: str, path: str, *, json_body: Any = None, **kwargs: Any) -> httpx.Response:
        """One request; a non-2xx answer raises ``Error: <message>``."""
        with self._errors():
            response = self._http.request(method, path, json=json_body, **kwargs)
        if response.is_error:
            raise api_error(error_message(response))
        return response

    def get(self, path: str) -> Any:
        return self.request("GET", path).json()

    def post(self, path: str, body: Any) -> Any:
        response = self.request("POST", path, json_body=body)
        return response.json() if response.content else {}

    def head_status(self, path: str) -> int:
        """The status code of a HEAD request (404 is an answer, not an error)."""
        with self._errors():
            return self._http.head(path).status_code

    def upload(self, path: str, body: Iterator[bytes], length: int) -> None:
        """POST a raw body streamed from an iterator."""
        with self._errors():
            response = self._http.post(path, content=body, headers={"Content-Length": str(length)})
        if response.is_error:
            raise api_error(error_message(response))

    def stream(self, method: str, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """Yield the NDJSON objects of a streaming answer; an ``error`` object raises."""
        timeout = httpx.Timeout(None, connect=5.0)
        with self._errors(), self._http.stream(method, path, json=body, timeout=timeout) as response:
            if response.is_error:
                response.read()
                raise api_error(error_message(response))
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise api_error(f"unexpected answer from the node: {line[:200]!r}") from exc
                if isinstance(item, dict) and item.get("error"):
                    raise api_error(str(item["error"]))
                yield item


def error_message(response: httpx.Response) -> str:
    """The ``error`` of an Ollama error body, else the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    text = response.text.strip()
    return text[:300] if text else f"{response.status_code} {response.reason_phrase}"


def client_for(ctx: click.Context) -> NodeClient:
    """The client for the node chosen by the group's options."""
    obj = ctx.find_root().obj or {}
    if obj.get("http3"):
        return NodeClient(discover_url(obj.get("host"), obj.get("config"), http3=True), ca=ca_file(obj.get("ca")))
    return NodeClient(discover_url(obj.get("host"), obj.get("config")))


def ensure_home_env(home: str | None) -> None:
    """``--home`` moves every omx file, exactly as ``OMX_HOME`` does."""
    if home:
        os.environ["OMX_HOME"] = str(Path(home).expanduser())
