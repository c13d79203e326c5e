"""omx.storage: the content-addressed model store.

Ollama-compatible layout under a root (``manifests/<host>/<namespace>/<model>/<tag>``,
``blobs/sha256-<hex>``) plus a BLAKE3 chunk index per blob (``chunks/``), partial
blobs that resume (``partial/``) and temp files (``tmp/``). The handlers use
:class:`ModelStore`; replication and registry pulls use :class:`BlobStore`,
:class:`PartialBlob` and :class:`ChunkIndex`.
"""

from __future__ import annotations

from .blobs import BlobInfo, BlobStore
from .chunks import DEFAULT_CHUNK_SIZE, BlobHasher, ChunkIndex, chunk_root, index_file, verify_chunk
from .create import CreateMessage, CreateRequest
from .gguf_meta import GGUFInfo, human_number, is_gguf, read_gguf_info
from .manifests import (
    CONFIG_MEDIA_TYPE,
    LAYER_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPE,
    MEDIA_ADAPTER,
    MEDIA_LICENSE,
    MEDIA_MESSAGES,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_PROJECTOR,
    MEDIA_SYSTEM,
    MEDIA_TEMPLATE,
    Layer,
    Manifest,
    ModelConfig,
    manifest_digest,
)
from .modelfile import Modelfile, ModelfileError, format_modelfile, format_parameters, parse_modelfile
from .models import ModelDetails, ModelEntry, ResolvedModel, model_row
from .names import DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG, ModelName, blob_filename, parse_digest
from .partial import PartialBlob
from .store import ModelStore

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "LAYER_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPE",
    "MEDIA_ADAPTER",
    "MEDIA_LICENSE",
    "MEDIA_MESSAGES",
    "MEDIA_MODEL",
    "MEDIA_PARAMS",
    "MEDIA_PROJECTOR",
    "MEDIA_SYSTEM",
    "MEDIA_TEMPLATE",
    "BlobHasher",
    "BlobInfo",
    "BlobStore",
    "ChunkIndex",
    "CreateMessage",
    "CreateRequest",
    "GGUFInfo",
    "Layer",
    "Manifest",
    "ModelConfig",
    "ModelDetails",
    "ModelEntry",
    "ModelName",
    "ModelStore",
    "Modelfile",
    "ModelfileError",
    "PartialBlob",
    "ResolvedModel",
    "blob_filename",
    "chunk_root",
    "format_modelfile",
    "format_parameters",
    "human_number",
    "index_file",
    "is_gguf",
    "manifest_digest",
    "model_row",
    "parse_digest",
    "parse_modelfile",
    "read_gguf_info",
    "verify_chunk",
]
