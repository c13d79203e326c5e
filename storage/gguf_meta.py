"""GGUF metadata, read from the file header without loading tensor data.

The header is walked over an ``mmap``: scalars and short arrays are decoded,
big arrays (the vocabulary) are skipped by length, tensor headers give the
parameter count. ``gguf.GGUFReader`` builds Python objects for every token of
the vocabulary (18 s for Gemma 3's 262k tokens on the reference machine), so
it is used only for its enums (``LlamaFileType``) and by the tests to write files. Values are
shaped for ``/api/show``: ``model_info`` carries every key/value pair as
Ollama's does, with ``general.parameter_count`` added, the big tokenizer
arrays (tokens, merges, token types, scores) replaced by ``None`` and the chat
template left out (it is shown as ``template``) unless ``verbose``.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from omx.errors import InvalidRequest

__all__ = ["GGUFInfo", "TensorTable", "human_number", "is_gguf", "read_gguf_info", "read_tensor_table"]

_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
_VERBOSE_ONLY_ARRAY_LIMIT = 64


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber``: 268098176 -> ``"268.10M"``, 8e9 -> ``"8B"``."""
    for unit, div, decimals in (("B", 1e9, 1), ("M", 1e6, 2)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == math.floor(v) else f"{v:.{decimals}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


@dataclass(frozen=True)
class GGUFInfo:
    """What omx needs to know about a GGUF file."""

    architecture: str
    parameter_count: int
    file_type: int | None
    quantization_level: str
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | list[int] | None
    head_count_kv: int | list[int] | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pooling_type: str | None
    model_info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count)

    @property
    def is_embedding(self) -> bool:
        """As Ollama decides: a model declaring ``<arch>.pooling_type`` is an embedding model."""
        return self.pooling_type is not None


def is_gguf(path: Path) -> bool:
    """Whether a file starts with the GGUF magic."""
    with open(path, "rb") as f:
        return f.read(4) in (b"GGUF", b"FUGG")


def _file_type_name(ft: int | None) -> str:
    if ft is None:
        return "unknown"
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(ft).name
    except ValueError:
        return "unknown"
    return {"ALL_F32": "F32"}.get(name, name.removeprefix("MOSTLY_"))


_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_FLOAT32 = 6
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20


class _Parser:
    """A GGUF header walker over an mmap: values are decoded only when wanted."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> int:
        start = self.pos
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        return start

    def value(self, vtype: int, *, keep_arrays: bool, offsets: list[int] | None = None) -> Any:
        if vtype == _FLOAT32:
            # The shortest text that reads back as the same float32 (1e-06, not 9.99999997e-07).
            return float(str(numpy.float32(self.unpack("<f"))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            if keep_arrays:
                fmt = "<" + _SCALARS[etype][1] * count
                out = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += size * count
                return out
            self.pos += size * count
            return None
        if etype == _STRING:
            if keep_arrays:
                return [self.string() for _ in range(count)]
            for _ in range(count):
                start = self.skip_string()
                if offsets is not None:
                    offsets.append(start)
            return None
        if keep_arrays:
            return [self.value(etype, keep_arrays=True) for _ in range(count)]
        for _ in range(count):
            self.value(etype, keep_arrays=False)
        return None


def _read_header(path: Path, verbose: bool) -> tuple[dict[str, Any], int, str | None, str | None]:
    """(metadata, parameter count, bos text, eos text); big tokenizer arrays come back as None."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        p = _Parser(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic (not a little-endian GGUF file)")
        p.pos = 4
        version = p.unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = p.unpack("<Q"), p.unpack("<Q")
        if n_kv > _MAX_KV:
            raise ValueError("implausible metadata count")
        kv: dict[str, Any] = {}
        token_offsets: list[int] = []
        for _ in range(n_kv):
            key = p.string()
            vtype = p.unpack("<I")
            small = vtype != _ARRAY or _array_len(buf, p.pos) <= _VERBOSE_ONLY_ARRAY_LIMIT
            keep = verbose or (small and not key.startswith("tokenizer.ggml."))
            offsets = token_offsets if key == "tokenizer.ggml.tokens" else None
            kv[key] = p.value(vtype, keep_arrays=keep, offsets=offsets)
        params = 0
        for _ in range(n_tensors):
            p.skip_string()
            n_dims = p.unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, p.pos)
            p.pos += 8 * n_dims + 4 + 8  # dims, ggml type, data offset
            params += math.prod(dims)

        def token(tid: Any) -> str | None:
            if isinstance(tid, int) and 0 <= tid < len(token_offsets):
                p.pos = token_offsets[tid]
                return p.string()
            if isinstance(tid, int) and isinstance(kv.get("tokenizer.ggml.tokens"), list):
                toks = kv["tokenizer.ggml.tokens"]
                return str(toks[tid]) if 0 <= tid < len(toks) else None
            return None

        return kv, params, token(kv.get("tokenizer.ggml.bos_token_id")), token(
            kv.get("tokenizer.ggml.eos_token_id"))


@dataclass(frozen=True)
class TensorTable:
    """A GGUF's metadata and where each tensor's data starts (what sizing a model's layers needs)."""

    metadata: dict[str, Any]
    """Values by key; arrays of more than a few items come back as None (their lengths are in ``array_lengths``)."""
    array_lengths: dict[str, int]
    tensors: tuple[tuple[str, int], ...]
    """(name, data offset relative to ``data_start``) in file order."""
    data_start: int
    file_size: int


def read_tensor_table(path: Path) -> TensorTable:
    """Read a GGUF's metadata and tensor table (blocking); raises ValueError when it is not a sound GGUF."""
    try:
        return _read_tensor_table(path)
    except struct.error as exc:
        raise ValueError("the GGUF header runs past the end of the file") from exc


def _read_tensor_table(path: Path) -> TensorTable:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        p = _Parser(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic (not a little-endian GGUF file)")
        p.pos = 8
        n_tensors, n_kv = p.unpack("<Q"), p.unpack("<Q")
        if n_kv > _MAX_KV:
            raise ValueError("implausible metadata count")
        kv: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = p.string()
            vtype = p.unpack("<I")
            if vtype == _ARRAY:
                lengths[key] = _array_len(buf, p.pos)
            kv[key] = p.value(vtype, keep_arrays=lengths.get(key, 0) <= _VERBOSE_ONLY_ARRAY_LIMIT)
        tensors = []
        for _ in range(n_tensors):
            name = p.string()
            n_dims = p.unpack("<I")
            p.pos += 8 * n_dims + 4  # dims, ggml type
            tensors.append((name, int(p.unpack("<Q"))))
        alignment = int(kv.get("general.alignment") or 32)
        return TensorTable(kv, lengths, tuple(tensors), -(-p.pos // alignment) * alignment, len(buf))


def _array_len(buf: mmap.mmap, pos: int) -> int:
    return int(struct.unpack_from("<Q", buf, pos + 4)[0])


def read_gguf_info(path: Path, *, verbose: bool = False) -> GGUFInfo:
    """Read a GGUF file's metadata (blocking); raises :class:`InvalidRequest` if it is not GGUF."""
    try:
        kv, params, bos, eos = _read_header(Path(path), verbose)
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{Path(path).name} is not a valid GGUF file: {e}") from e
    arch = str(kv.get("general.architecture") or "unknown")
    ft_raw = kv.get("general.file_type")
    ft = int(ft_raw) if isinstance(ft_raw, int) else None
    template = kv.get("tokenizer.chat_template")
    info = {k: v for k, v in kv.items() if verbose or k != "tokenizer.chat_template"}
    info["general.parameter_count"] = params
    info = dict(sorted(info.items()))
    pooling_raw = kv.get(f"{arch}.pooling_type")
    pooling = _POOLING.get(pooling_raw, str(pooling_raw)) if pooling_raw is not None else None
    return GGUFInfo(
        architecture=arch,
        parameter_count=params,
        file_type=ft,
        quantization_level=_file_type_name(ft),
        context_length=kv.get(f"{arch}.context_length"),
        embedding_length=kv.get(f"{arch}.embedding_length"),
        block_count=kv.get(f"{arch}.block_count"),
        head_count=kv.get(f"{arch}.attention.head_count"),
        head_count_kv=kv.get(f"{arch}.attention.head_count_kv"),
        chat_template=template if isinstance(template, str) else None,
        bos_token=bos,
        eos_token=eos,
        pooling_type=pooling,
        model_info=info,
    )
