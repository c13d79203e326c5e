"""``/api/create``: the request model and the create pipeline.

Both of Ollama's request styles are accepted:

* new: ``from`` (an existing model) or ``files`` (``{filename: digest}`` of blobs
  uploaded with ``/api/blobs``), plus ``adapters``, ``template``, ``system``,
  ``license``, ``parameters``, ``messages``;
* legacy: ``modelfile`` text, whose ``FROM``/``ADAPTER`` name a model or a
  ``@sha256:<hex>`` blob. The server never opens a path a client names: a
  ``FROM ./model.gguf`` is refused with a message saying to upload the file,
  as ``ollama create`` and ``omx create`` do.

Explicit fields win over the modelfile's. Every request error is raised before
the first status is yielded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omx.errors import InvalidModelName, InvalidRequest
from omx.types import BlobDigest

from .blobs import BlobStore
from .gguf_meta import GGUFInfo, human_number
from .manifests import (
    CONFIG_MEDIA_TYPE,
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
)
from .modelfile import MESSAGE_ROLES, coerce_parameters, parse_modelfile
from .models import ResolvedModel
from .names import ModelName, parse_digest

__all__ = ["CreateMessage", "CreateRequest", "CreateTarget", "run_create"]


class CreateTarget(Protocol):
    """What the create pipeline uses of the model store (:class:`~omx.storage.store.ModelStore`)."""

    @property
    def blobs(self) -> BlobStore: ...

    def resolve_sync(self, name: ModelName | str) -> ResolvedModel: ...

    def gguf_info(self, digest: BlobDigest) -> GGUFInfo | None: ...

    def write_manifest(self, name: ModelName, manifest: Manifest) -> BlobDigest: ...


class CreateMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = ""


class CreateRequest(BaseModel):
    """The body of ``POST /api/create`` (``model``/``name`` is read by the handler)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model: str | None = None
    name: str | None = None
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[CreateMessage] | None = None
    modelfile: str | None = None
    quantize: str | None = None
    quantization: str | None = None
    stream: bool | None = None


@dataclass(frozen=True)
class _Spec:
    from_name: ModelName | None
    files: tuple[tuple[str, BlobDigest], ...]
    adapters: tuple[tuple[str, BlobDigest], ...]
    template: str | None
    system: str | None
    license: tuple[str, ...] | None
    params: Mapping[str, Any] | None
    messages: tuple[Mapping[str, str], ...] | None


_PATH_HINT = ("upload it with POST /api/blobs/sha256:<digest> and create with 'files' "
              "(as 'omx create -f' and 'ollama create' do)")


def _check_file_name(fname: str) -> None:
    parts = fname.split("/")
    if (fname in ("", ".") or fname.startswith("/") or "\\" in fname or ":" in fname or "\x00" in fname
            or any(p in ("", ".", "..") for p in parts)):
        raise InvalidRequest(f"file path must be relative: {fname!r}")


def _reference(value: str, what: str) -> tuple[ModelName | None, BlobDigest | None]:
    """A FROM/ADAPTER argument: a model name or a blob digest; never a server-side path."""
    v = value.strip()
    if v.startswith("@"):
        return None, parse_digest(v[1:])
    if v.startswith("sha256:") or v.startswith("sha256-"):
        return None, parse_digest(v)
    looks_like_path = (v.startswith(("/", "./", "../", "~", ".")) or "\\" in v
                       or v.lower().endswith((".gguf", ".bin", ".safetensors")))
    if looks_like_path:
        raise InvalidRequest(f"{what} {v!r} names a file: the server does not read files by path; {_PATH_HINT}")
    try:
        return ModelName.parse(v), None
    except InvalidModelName as e:
        raise InvalidRequest(f"{what} {v!r} is neither a model name nor a blob digest: {e}") from None


def _spec(req: CreateRequest) -> _Spec:
    if req.quantize or req.quantization:
        raise InvalidRequest("quantization is not supported: quantize GGUF models with llama.cpp tools "
                             "before importing")
    from_name: ModelName | None = None
    files: dict[str, BlobDigest] = {}
    adapters: dict[str, BlobDigest] = {}
    template, system = req.template, req.system
    license: tuple[str, ...] | None = None
    params: dict[str, Any] | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    if req.modelfile:
        mf = parse_modelfile(req.modelfile)
        name, digest = _reference(mf.from_ or "", "FROM")
        if digest is not None:
            files["model.gguf"] = digest
        from_name = name
        for i, a in enumerate(mf.adapters):
            aname, adigest = _reference(a, "ADAPTER")
            if adigest is None:
                raise InvalidRequest(f"ADAPTER {aname} must be an uploaded blob (@sha256:<digest>)")
            adapters[f"adapter{i}.gguf"] = adigest
        template = template if template is not None else mf.template
        system = system if system is not None else mf.system
        license = mf.license or None
        params = dict(mf.parameters) or None
        messages = tuple(mf.messages) or None
    if req.from_:
        name, digest = _reference(req.from_, "from")
        if digest is not None:
            files["model.gguf"] = digest
        from_name = name
    for fname, d in (req.files or {}).items():
        _check_file_name(fname)
        files[fname] = parse_digest(d)
    for fname, d in (req.adapters or {}).items():
        _check_file_name(fname)
        adapters[fname] = parse_digest(d)
    if from_name is not None and files:
        raise InvalidRequest("specify either 'from' (an existing model) or 'files', not both")
    if from_name is None and not files:
        raise InvalidRequest("neither 'from' or 'files' was specified")
    if req.license is not None:
        license = (req.license,) if isinstance(req.license, str) else tuple(req.license)
    if req.parameters is not None:
        params = {**(params or {}), **coerce_parameters(req.parameters)}
    if req.messages is not None:
        messages = tuple({"role": m.role, "content": m.content} for m in req.messages)
    for m in messages or ():
        if m["role"] not in MESSAGE_ROLES:
            raise InvalidRequest(f"invalid message role {m['role']!r}")
    return _Spec(from_name, tuple(sorted(files.items())), tuple(sorted(adapters.items())), template, system,
                 license, params, messages)


@dataclass(frozen=True)
class _Inputs:
    base: ResolvedModel | None
    files: tuple[tuple[str, BlobDigest, int, GGUFInfo], ...]
    adapters: tuple[tuple[BlobDigest, int], ...]


def _gather(store: CreateTarget, spec: _Spec) -> _Inputs:
    """Check that everything named exists and is GGUF (blocking)."""
    base = store.resolve_sync(spec.from_name) if spec.from_name is not None else None
    files = []
    for fname, digest in (*spec.files, *spec.adapters):
        if not store.blobs.has(digest):
            raise InvalidRequest(f"blob {digest} for {fname!r} not found: upload it with POST /api/blobs/{digest}")
        info = store.gguf_info(digest)
        if info is None:
            raise InvalidRequest(f"supplied file {fname!r} was not in GGUF format")
        files.append((fname, digest, store.blobs.size(digest), info))
    adapter_digests = {d for _, d in spec.adapters}
    model_files = tuple(f for f in files if f[1] not in adapter_digests)
    adapters = tuple((f[1], f[2]) for f in files if f[1] in adapter_digests)
    return _Inputs(base, model_files, adapters)


def _kind(info: GGUFInfo) -> str:
    gtype = str(info.model_info.get("general.type") or "")
    if gtype == "adapter":
        return MEDIA_ADAPTER
    if gtype in ("projector", "mmproj") or info.architecture == "clip":
        return MEDIA_PROJECTOR
    return MEDIA_MODEL


async def run_create(store: CreateTarget, name: ModelName | str, request: CreateRequest | Mapping[str, Any]
                     ) -> AsyncIterator[str]:
    """The create pipeline (see :meth:`ModelStore.create`)."""
    target = ModelName.parse(name) if isinstance(name, str) else name
    try:
        req = request if isinstance(request, CreateRequest) else CreateRequest.model_validate(request)
    except ValidationError as e:
        raise InvalidRequest(f"invalid create request: {e.errors()[0]['msg']}") from None
    spec = _spec(req)
    inputs = await asyncio.to_thread(_gather, store, spec)

    layers: list[Layer] = []
    config = ModelConfig()
    if inputs.base is not None:
        base = inputs.base
        config = base.config
        for layer in base.manifest.layers:
            if layer.media_type == MEDIA_MODEL and not layer.from_:
                layer = replace(layer, from_=base.name.display)
            layers.append(layer)
            yield f"using existing layer {layer.digest}"
    model_seen = False
    for fname, digest, size, info in inputs.files:
        yield "parsing GGUF"
        media = _kind(info)
        if media == MEDIA_MODEL:
            if model_seen:
                raise InvalidRequest(f"more than one model file in 'files' ({fname!r}); split GGUF is not supported")
            model_seen = True
            config = ModelConfig(model_format="gguf", model_family=info.architecture,
                                 model_families=(info.architecture,), model_type=human_number(info.parameter_count),
                                 file_type=info.quantization_level)
        layers.append(Layer(media, digest, size))
        yield f"using existing layer {digest}"
    if inputs.base is None and not model_seen:
        raise InvalidRequest("no model file among 'files': one GGUF with the model weights is needed")
    for digest, size in inputs.adapters:
        layers.append(Layer(MEDIA_ADAPTER, digest, size))
        yield f"using existing layer {digest}"

    new: list[tuple[str, bytes]] = []
    if spec.template is not None:
        new.append((MEDIA_TEMPLATE, spec.template.encode()))
    if spec.system is not None:
        new.append((MEDIA_SYSTEM, spec.system.encode()))
    if spec.license is not None:
        new += [(MEDIA_LICENSE, text.encode()) for text in spec.license]
    if spec.params is not None:
        merged = {**(inputs.base.params if inputs.base else {}), **spec.params}
        new.append((MEDIA_PARAMS, json.dumps(merged, separators=(",", ":")).encode()))
    if spec.messages is not None:
        new.append((MEDIA_MESSAGES, json.dumps(list(spec.messages), separators=(",", ":")).encode()))
    replaced = {media for media, _ in new}
    layers = [layer for layer in layers if layer.media_type not in replaced]
    for media, data in new:
        info_w = await asyncio.to_thread(store.blobs.write_bytes, data)
        layers.append(Layer(media, info_w.digest, info_w.size))
        verb = "creating new layer" if info_w.created else "using existing layer"
        yield f"{verb} {info_w.digest}"

    config = replace(config, diff_ids=tuple(layer.digest for layer in layers))
    config_blob = await asyncio.to_thread(store.blobs.write_bytes, config.to_bytes())
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, config_blob.digest, config_blob.size), tuple(layers))
    yield "writing manifest"
    await asyncio.to_thread(store.write_manifest, target, manifest)
    yield "success"
