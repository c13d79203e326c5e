"""How many layers of a model go to the GPU by default.

As Ollama does, the runner estimates what one layer costs on the GPU (its
weights from the GGUF's tensor table plus its share of the KV cache) and
offloads as many layers as fit in the free VRAM after a reserve for the
compute graph and the driver. :func:`fit_layers` and
:func:`compute_graph_bytes` are pure; :func:`read_layer_costs` reads a GGUF's
tensor table; :func:`gpu_free_memory` asks ggml's device registry (0 on a
CPU-only build). A request, Modelfile or ``engine.num_gpu`` that names a
layer count wins over the estimate (``num_gpu`` -1 means "estimate").
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omx.storage.gguf_meta import read_tensor_table

__all__ = ["GpuFit", "LayerCosts", "compute_graph_bytes", "fit_layers", "gpu_free_memory", "plan_offload",
           "read_layer_costs", "resolve_gpu_layers"]

DRIVER_RESERVE = 512 * 2**20
"""VRAM left for the CUDA/ROCm context and allocator slack (Ollama keeps a few hundred MiB too)."""



@dataclass(frozen=True)
class LayerCosts:
    """What a model's parts weigh, in bytes, and the shapes its KV cache depends on."""

    layers: tuple[int, ...]
    """Weights of each repeating block ``blk.N``."""
    output: int
    """Weights that follow the last block onto the GPU (output norm and projection)."""
    kv_bytes_per_token_layer: int
    """K and V of one token in one layer, as f16."""
    n_vocab: int
    n_embd: int


@dataclass(frozen=True)
class GpuFit:
    layers: int
    """``n_gpu_layers`` to load with (``len(layers) + 1`` also puts the output layer on the GPU)."""
    vram: int
    """Bytes that offload places in VRAM (weights and KV cache of those layers)."""


def compute_graph_bytes(n_ubatch: int, n_vocab: int, n_embd: int) -> int:
    """The compute buffer llama.cpp reserves: logits of a micro-batch plus activations (an upper estimate)."""
    return 4 * n_ubatch * (n_vocab + 8 * n_embd)


def fit_layers(costs: LayerCosts, *, free: int, n_ctx_total: int, n_ubatch: int,
               reserve: int = DRIVER_RESERVE) -> GpuFit:
    """The most layers whose weights and KV cache (``n_ctx_total`` cells) fit in ``free`` bytes of VRAM."""
    room = free - reserve - compute_graph_bytes(n_ubatch, costs.n_vocab, costs.n_embd)
    kv = costs.kv_bytes_per_token_layer * n_ctx_total
    used = 0
    count = 0
    for weights in costs.layers:
        if used + weights + kv > room:
            return GpuFit(count, used)
        used += weights + kv
        count += 1
    if used + costs.output <= room:
        return GpuFit(count + 1, used + costs.output)
    return GpuFit(count, used)


def resolve_gpu_layers(requested: int, *, supported: bool, costs: LayerCosts | None, free: int, n_ctx_total: int,
                       n_ubatch: int) -> GpuFit:
    """``requested`` layers (-1: estimate); no GPU offload in the build means none at all."""
    if not supported:
        return GpuFit(0, 0)
    if requested >= 0:
        if costs is None:
            return GpuFit(requested, 0)
        layers = list(costs.layers)
        n = min(requested, len(layers))
        kv = costs.kv_bytes_per_token_layer * n_ctx_total
        vram = sum(layers[len(layers) - n:]) + n * kv + (costs.output if requested > len(layers) else 0)
        return GpuFit(requested, vram)
    if costs is None:
        return GpuFit(0, 0)
    return fit_layers(costs, free=free, n_ctx_total=n_ctx_total, n_ubatch=n_ubatch)


# ------------------------------------------------------------------ sizing a model from its tensor table


def read_layer_costs(path: Path) -> LayerCosts:
    """Per-layer weight sizes (from tensor offsets) and KV-cache shape of a GGUF file."""
    table = read_tensor_table(path)
    kv, tensors = table.metadata, table.tensors
    n_vocab = table.array_lengths.get("tokenizer.ggml.tokens", 0)
    end = table.file_size - table.data_start
    ordered = sorted(tensors, key=lambda t: t[1])
    sizes = {name: (ordered[i + 1][1] if i + 1 < len(ordered) else end) - offset
             for i, (name, offset) in enumerate(ordered)}
    arch = str(kv.get("general.architecture", ""))
    n_layer = int(kv.get(f"{arch}.block_count") or 0)
    layers = [0] * n_layer
    output = 0
    for name, size in sizes.items():
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            if index < n_layer:
                layers[index] += size
        elif name.startswith("output"):
            output += size
    if not any(name.startswith("output.") for name in sizes):
        output += sizes.get("token_embd.weight", 0)  # tied embeddings: the output projection reuses them
    n_embd = int(kv.get(f"{arch}.embedding_length") or 0)
    n_head = _scalar(kv.get(f"{arch}.attention.head_count")) or 1
    n_head_kv = _scalar(kv.get(f"{arch}.attention.head_count_kv")) or n_head
    key_len = int(kv.get(f"{arch}.attention.key_length") or n_embd // n_head)
    value_len = int(kv.get(f"{arch}.attention.value_length") or n_embd // n_head)
    n_vocab = n_vocab or int(kv.get(f"{arch}.vocab_size") or 0)
    if not n_vocab:
        n_vocab = sizes.get("token_embd.weight", 0) // max(1, n_embd)  # at least one byte per weight
    return LayerCosts(tuple(layers), output, 2 * n_head_kv * (key_len + value_len), n_vocab, n_embd)


def _scalar(value: Any) -> int:
    if isinstance(value, list):
        return max((int(v) for v in value), default=0)
    return int(value or 0)


def gpu_free_memory(lib_dir: Path | None = None) -> int:
    """Free bytes over ggml's GPU devices (0 where the build has none or the query fails)."""
    try:
        if lib_dir is None:
            import llama_cpp

            lib_dir = Path(llama_cpp.__file__).parent / "lib"
        ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
        base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    except OSError:
        return 0
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    free_total = 0
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if base.ggml_backend_dev_type(dev) in (1, 2):  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            free_total += free.value
    return free_total


def plan_offload(model_path: Path, requested: int, *, n_ctx_total: int, n_ubatch: int) -> GpuFit:
    """The offload a runner loads with: ``requested`` layers, or (-1) as many as the free VRAM holds."""
    import llama_cpp

    supported = bool(llama_cpp.llama_supports_gpu_offload())
    costs: LayerCosts | None = None
    if supported:
        try:
            costs = read_layer_costs(model_path)
        except (OSError, ValueError):
            costs = None
    free = gpu_free_memory() if supported and requested < 0 else 0
    return resolve_gpu_layers(requested, supported=supported, costs=costs, free=free, n_ctx_total=n_ctx_total,
                              n_ubatch=n_ubatch)
