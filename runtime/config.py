"""Node configuration.

Sources, lowest precedence first: defaults, ``$OMX_HOME/config.yaml`` (or the
file given with ``--config``), ``OMX_*`` environment variables with ``__``
nesting (``OMX_API__PORT=9000``), then explicit overrides (CLI flags).
``OMX_HOME`` (default ``~/.ollamamax``) relocates every file omx writes.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from omx.errors import ConfigError

__all__ = [
    "ApiConfig",
    "ClusterConfig",
    "EngineConfig",
    "ModelsConfig",
    "NodeConfig",
    "P2PConfig",
    "PeerConfig",
    "ReplicationConfig",
    "RoutingConfig",
    "SecurityConfig",
    "Settings",
    "WebConfig",
    "load_settings",
    "omx_home",
    "parse_duration",
    "parse_size",
]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def omx_home() -> Path:
    """The root of everything omx writes (``$OMX_HOME``, default ``~/.ollamamax``)."""
    return Path(os.environ.get("OMX_HOME") or Path.home() / ".ollamamax").expanduser()


def parse_size(value: object) -> int:
    """``"10GB"`` / ``"512MiB"`` / ``1024`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10GB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r} (use e.g. 512MB, 10GB, 1TiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_duration(value: object) -> float:
    """Ollama-style durations: ``"5m"``, ``"1h30m"``, ``"300"``/``300`` (seconds), ``"-1"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5m")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ValueError("a duration must be a number of seconds, not NaN")
        return float(value)
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(seconds):
            raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 1h)")
        return seconds
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 5m, 1h)")
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeConfig(_Section):
    name: str | None = Field(default=None, description="Optional human name shown beside the node id.")


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    advertise: str | None = None
    http3: bool = Field(default=True, description=(
        "Also serve the API as HTTP/3 over QUIC (UDP, TLS from the cluster CA under $OMX_HOME/tls/)."))
    h3_port: int | None = Field(default=None, ge=0, le=65535, description=(
        "UDP port of the HTTP/3 listener (default: the same number as api.port; 0: any free port)."))


class WebConfig(_Section):
    enabled: bool = Field(default=True, description="Serve the web dashboard on web.port (false: no web listener).")
    port: int = Field(default=8081, ge=0, le=65535, description=(
        "TCP port of the web dashboard, on the API's bind address (0: any free port)."))


class P2PConfig(_Section):
    port: int = Field(default=4001, ge=0, le=65535)
    bind: str | None = None
    advertise: str | None = None
    profile: Literal["lan", "wan", "local"] = "lan"
    join: list[str] = Field(default_factory=list)
    transfer_port: int = Field(default=0, ge=0, le=65535, description=(
        "TCP port of the transfer listener serving chunks and forwarded calls to peers (0: any free port, "
        "told to peers in the gossip tags)."))


class ModelsConfig(_Section):
    store_path: Path | None = None
    max_cache_size: int = 10 * 10**9
    auto_cleanup: bool = True
    download_timeout: float = 1800.0
    concurrency: int = Field(default=3, ge=1, le=64)
    chunk_size: int = 8 * 2**20
    extra_stores: list[Path] = Field(default_factory=list)
    registry: str = "registry.ollama.ai"
    insecure: bool = False

    @field_validator("max_cache_size", "chunk_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @field_validator("download_timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        seconds = parse_duration(value)
        if not 0 < seconds < math.inf:
            raise ValueError("download_timeout must be a positive, finite duration (e.g. 30m)")
        return seconds

    @field_validator("chunk_size")
    @classmethod
    def _chunk_bounds(cls, value: int) -> int:
        if not 64 * 2**10 <= value <= 256 * 2**20:
            raise ValueError("chunk_size must be between 64KiB and 256MiB")
        return value


class ReplicationConfig(_Section):
    factor: int = Field(default=2, ge=1, le=16)
    max_bandwidth: int = Field(default=0, ge=0, description=(
        "Bytes per second this node receives from peers, all transfers together (0: unlimited)."))
    max_factor: int = Field(default=4, ge=1, le=16, description=(
        "Most holders a model gets when replicas follow demand: while requests for a model wait on every "
        "holder, a copy is added on an idle node with room, up to this many holders (1: never)."))
    idle_after: float = Field(default=600.0, description=(
        "A copy added for demand is dropped after this long without a request, never below the model's factor."))

    @field_validator("idle_after", mode="before")
    @classmethod
    def _idle_after(cls, value: object) -> float:
        seconds = parse_duration(value)
        if not 0 < seconds < math.inf:
            raise ValueError("idle_after must be a positive, finite duration (e.g. 10m)")
        return seconds

    @field_validator("max_bandwidth", mode="before")
    @classmethod
    def _rate(cls, value: object) -> int:
        if isinstance(value, str):
            value = value.strip().removesuffix("/s").removesuffix("ps")
        return parse_size(value)


class RoutingConfig(_Section):
    queue_timeout: float = Field(default=30.0, description=(
        "When every node holding a model is busy (all its slots taken), a request waits on the node that "
        "took it in for a free slot anywhere, this long at most, then gets 503 with Retry-After "
        "(at most engine.max_queue requests wait; 0: no holding, the request queues on the best holder)."))

    @field_validator("queue_timeout", mode="before")
    @classmethod
    def _queue_timeout(cls, value: object) -> float:
        seconds = parse_duration(value)
        if not 0 <= seconds < math.inf:
            raise ValueError("queue_timeout must be a finite duration of at least 0 (e.g. 30s)")
        return seconds


class EngineConfig(_Section):
    backend: Literal["llama_cpp", "ctransformers"] = "llama_cpp"
    num_parallel: int = Field(default=1, ge=1, le=64)
    max_loaded_models: int = Field(default=3, ge=1, le=64)
    keep_alive: float = 300.0
    max_queue: int = Field(default=512, ge=1)
    num_thread: int | None = Field(default=None, ge=1, le=1024)
    num_ctx: int = Field(default=4096, ge=64, le=2**24)
    num_gpu: int | None = Field(default=None, ge=0, le=1024, description=(
        "Layers offloaded to the GPU when a model or request does not say (null: as many as fit in free VRAM)."))
    batching: bool = Field(default=True, description=(
        "llama_cpp: serve num_parallel requests as sequences of one context decoded together "
        "(false: one context per slot)."))
    kv_unified: bool = Field(default=False, description=(
        "llama_cpp with batching: one KV cache of num_ctx x num_parallel cells shared by up to max_sequences "
        "requests, each admitted when free cells cover its prompt, and set aside (its tokens read again later) "
        "when the cache fills; serves more short requests in the same memory, but a request's output may "
        "differ numerically from bare llama.cpp (false: a cache of num_ctx cells per sequence)."))
    max_sequences: int | None = Field(default=None, ge=1, le=256, description=(
        "With kv_unified: most requests decoded together per loaded model (null: 4 x num_parallel)."))

    @field_validator("backend", mode="before")
    @classmethod
    def _backend(cls, value: object) -> object:
        return value.replace("-", "_") if isinstance(value, str) else value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: object) -> float:
        return parse_duration(value)


class SecurityConfig(_Section):
    api_keys: list[str] = Field(default_factory=list)
    admin_keys: list[str] = Field(
        default_factory=list, description="API keys that may also administer the cluster (/api/cluster/*).")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Reverse proxies (IPs or CIDRs) whose X-Forwarded-For is believed.")
    metrics_public: bool = True

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from exc
        return value


class ClusterConfig(_Section):
    secret_file: Path | None = None
    token: str | None = Field(
        default=None, description="A join token (from `omx cluster token`); never written to disk."
    )


class PeerConfig(_Section):
    transport: Literal["http1", "http3"] = Field(default="http1", description=(
        "How this node reaches its peers for chunk transfers and forwarded calls: http1 (TCP: the transfer "
        "listener with sendfile, the API port) or http3 (QUIC to each peer's HTTP/3 port, verified against "
        "the cluster CA; a peer with api.http3 off is reached over http1)."))


class Settings(BaseSettings):
    """The whole configuration of one node."""

    model_config = SettingsConfigDict(env_prefix="OMX_", env_nested_delimiter="__", extra="forbid")

    node: NodeConfig = Field(default_factory=lambda: NodeConfig())
    api: ApiConfig = Field(default_factory=lambda: ApiConfig())
    web: WebConfig = Field(default_factory=lambda: WebConfig())
    p2p: P2PConfig = Field(default_factory=lambda: P2PConfig())
    models: ModelsConfig = Field(default_factory=lambda: ModelsConfig())
    replication: ReplicationConfig = Field(default_factory=lambda: ReplicationConfig())
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig())
    security: SecurityConfig = Field(default_factory=lambda: SecurityConfig())
    cluster: ClusterConfig = Field(default_factory=lambda: ClusterConfig())
    peer: PeerConfig = Field(default_factory=lambda: PeerConfig())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI overrides (init kwargs) beat the environment, which beats the file.
        return (init_settings, env_settings, _YamlSource(settings_cls))

    # ----------------------------------------------------------- derived paths

    @property
    def home(self) -> Path:
        return omx_home()

    @property
    def store_path(self) -> Path:
        return (self.models.store_path or self.home / "data" / "models").expanduser()

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def secret_path(self) -> Path:
        return (self.cluster.secret_file or self.home / "cluster" / "secret").expanduser()


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file's values, handed over by :func:`load_settings`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _file_values.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get({}))


_file_values: ContextVar[dict[str, Any]] = ContextVar("omx_config_file_values")


def _env_overrides_present() -> bool:
    return any(key.startswith("OMX_") and "__" in key for key in os.environ)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def default_config_path() -> Path:
    return omx_home() / "config.yaml"


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the configuration, raising :class:`ConfigError` naming the bad key."""
    path = config_file or default_config_path()
    if config_file is not None and not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    token = _file_values.set(_read_yaml(path) if path.exists() else {})
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        origin = "environment" if _env_overrides_present() else str(path)
        raise ConfigError(f"invalid config key '{key}' ({origin}): {first['msg']}", key=key) from exc
    finally:
        _file_values.reset(token)
