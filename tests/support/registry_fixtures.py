"""Shared pieces of the registry tests: a client over a real socket, and test models."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from omx.runtime.registry_http import HttpxRegistryTransport
from omx.storage.blobs import BlobStore
from omx.storage.registry import RegistryClient, RegistryOptions

__all__ = ["CHUNK", "collect", "make_client", "make_layers"]

CHUNK = 64 * 1024
MODEL_TYPE = "application/vnd.ollama.image.model"
TEMPLATE_TYPE = "application/vnd.ollama.image.template"
PARAMS_TYPE = "application/vnd.ollama.image.params"


def make_layers(model_size: int = 20 * CHUNK + 123) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A config blob and three layers (a random 'model' of ``model_size`` bytes, template, params)."""
    config = b'{"model_format":"gguf","model_family":"llama","model_type":"1M","file_type":"Q4_K_M",' \
             b'"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    return config, [
        (MODEL_TYPE, os.urandom(model_size)),
        (TEMPLATE_TYPE, b"{{ .Prompt }}" + os.urandom(8).hex().encode()),
        (PARAMS_TYPE, b'{"stop":["<eos>"]}'),
    ]


def make_client(root: Path, registry: str, **options: Any) -> tuple[RegistryClient, HttpxRegistryTransport]:
    opts: dict[str, Any] = {"default_registry": registry, "insecure": True, "concurrency": 3,
                            "backoff": 0.01, "max_backoff": 0.05, "stall_timeout": 20.0}
    opts.update(options)
    transport = HttpxRegistryTransport()
    return RegistryClient(BlobStore(root, chunk_size=CHUNK), transport, RegistryOptions(**opts)), transport


async def collect(events: AsyncIterator[Any]) -> list[dict[str, Any]]:
    return [e.to_ollama() async for e in events]
