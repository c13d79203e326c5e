"""The built-in handlers: Ollama's API, OpenAI's compatible API, cluster endpoints."""

from __future__ import annotations

from omx.functions.builtin import (
    cluster,
    cluster_admin,
    custom_functions,
    embed,
    generate,
    models,
    openai,
    peer_blobs,
    peer_load,
    pull,
    replication,
    traffic,
)
from omx.functions.openapi import register as register_openapi
from omx.functions.registry import FunctionRegistry

__all__ = ["builtin_registry"]


def builtin_registry(*, metrics_public: bool = True) -> FunctionRegistry:
    """A registry holding every built-in handler; ``/metrics`` needs an API key unless ``metrics_public``."""
    registry = FunctionRegistry()
    for module in (models, generate, embed, openai, pull, cluster_admin, peer_blobs, peer_load,
                   replication, custom_functions, traffic):
        module.register(registry)
    cluster.register(registry, metrics_public=metrics_public)
    register_openapi(registry)
    return registry
