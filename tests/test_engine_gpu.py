"""GPU offload by default: the layer estimate (pure) and what a CPU-only build reports."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from omx.runtime.engine import LlamaCppEngine
from omx.runtime.engine._gpu import (
    DRIVER_RESERVE,
    LayerCosts,
    compute_graph_bytes,
    fit_layers,
    gpu_free_memory,
    plan_offload,
    read_layer_costs,
    resolve_gpu_layers,
)
from tests.support.node import NodeProcess
from tests.support.tiny_gguf import write_tiny_llama
from tests.test_engine_llama import spec_for

MiB = 2**20
COSTS = LayerCosts(layers=(100 * MiB,) * 10, output=300 * MiB, kv_bytes_per_token_layer=1024, n_vocab=32000,
                   n_embd=2048)


def _room(layers: int, *, n_ctx: int = 4096, output: bool = False) -> int:
    """Free VRAM in which exactly ``layers`` layers (and the output layer when asked) fit."""
    graph = compute_graph_bytes(512, COSTS.n_vocab, COSTS.n_embd)
    return DRIVER_RESERVE + graph + layers * (100 * MiB + 1024 * n_ctx) + (300 * MiB if output else 0)


def test_everything_fits_offloads_the_output_layer_too() -> None:
    fit = fit_layers(COSTS, free=_room(10, output=True), n_ctx_total=4096, n_ubatch=512)
    assert fit.layers == 11
    assert fit.vram == 10 * (100 * MiB + 1024 * 4096) + 300 * MiB


@pytest.mark.parametrize("layers", [0, 1, 5, 9, 10])
def test_as_many_layers_as_fit(layers: int) -> None:
    assert fit_layers(COSTS, free=_room(layers), n_ctx_total=4096, n_ubatch=512).layers == layers
    assert fit_layers(COSTS, free=_room(layers) - 1, n_ctx_total=4096, n_ubatch=512).layers == max(0, layers - 1)


def test_a_bigger_kv_cache_leaves_room_for_fewer_layers() -> None:
    free = _room(8)
    small = fit_layers(COSTS, free=free, n_ctx_total=4096, n_ubatch=512).layers
    # num_parallel 4 at the same num_ctx: four times the cells per layer.
    big = fit_layers(COSTS, free=free, n_ctx_total=4 * 4096, n_ubatch=512).layers
    assert small == 8 and big < small


def test_too_little_vram_offloads_nothing() -> None:
    assert fit_layers(COSTS, free=DRIVER_RESERVE, n_ctx_total=4096, n_ubatch=512).layers == 0
    assert fit_layers(COSTS, free=0, n_ctx_total=4096, n_ubatch=512).vram == 0


def test_an_explicit_layer_count_wins_and_no_gpu_means_none() -> None:
    fit = resolve_gpu_layers(3, supported=True, costs=COSTS, free=0, n_ctx_total=4096, n_ubatch=512)
    assert fit.layers == 3 and fit.vram == 3 * (100 * MiB + 1024 * 4096)
    assert resolve_gpu_layers(99, supported=True, costs=COSTS, free=0, n_ctx_total=1, n_ubatch=512).vram == (
        10 * (100 * MiB + 1024) + 300 * MiB)
    auto = resolve_gpu_layers(-1, supported=True, costs=COSTS, free=_room(4), n_ctx_total=4096, n_ubatch=512)
    assert auto.layers == 4
    for requested in (-1, 0, 5):
        assert resolve_gpu_layers(requested, supported=False, costs=COSTS, free=10**12, n_ctx_total=4096,
                                  n_ubatch=512).layers == 0


def test_layer_costs_come_from_the_gguf_tensor_table(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", seed=1, n_layer=3, n_embd=64, n_head=4, n_ff=128)
    costs = read_layer_costs(path)
    # Per block: q, k, v, o (64x64) + gate, up, down (64x128) f32, plus two 64-wide norms, padded to 32 bytes.
    per_block = 4 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)
    assert len(costs.layers) == 3 and all(per_block <= size < per_block + 32 * 9 for size in costs.layers)
    assert costs.kv_bytes_per_token_layer == 2 * 64 * 2  # K and V, 4 heads x 16, f16
    assert costs.n_embd == 64 and costs.n_vocab == llama_cpp.Llama(str(path), vocab_only=True,
                                                                   verbose=False).n_vocab()
    assert costs.output > 0


def test_a_truncated_gguf_is_a_value_error_not_a_read_past_its_end(tmp_path: Path) -> None:
    whole = write_tiny_llama(tmp_path / "t.gguf", seed=1).read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (4, 24, len(whole) // 50):
        cut.write_bytes(whole[:size])
        with pytest.raises(ValueError):
            read_layer_costs(cut)


def test_a_cpu_build_offloads_nothing(tmp_path: Path) -> None:
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("llama-cpp-python here was built with a GPU backend")
    assert gpu_free_memory() == 0
    path = write_tiny_llama(tmp_path / "t.gguf", seed=1)
    assert plan_offload(path, -1, n_ctx_total=1024, n_ubatch=512).layers == 0


async def test_runner_reports_no_vram_on_a_cpu_build(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", seed=1)
    from dataclasses import replace

    runner = await LlamaCppEngine().start(replace(spec_for(path), num_gpu=-1))
    try:
        assert runner.info["n_gpu_layers"] == 0 and runner.info["size_vram"] == 0
    finally:
        await runner.close()


def test_api_ps_reports_size_vram_of_the_runner(node: NodeProcess) -> None:
    with node.client() as http:
        http.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                         "options": {"num_predict": 1}}).raise_for_status()
        rows = http.get("/api/ps").json()["models"]
        runners = http.get("/api/distributed/status").json()["runner_stats"]["runners"]
    row = next(r for r in rows if r["name"].startswith("tiny"))
    runner = next(r for r in runners if r["model"].startswith("tiny"))
    assert isinstance(row["size_vram"], int) and row["size_vram"] == runner["size_vram"]
    if not llama_cpp.llama_supports_gpu_offload():
        assert row["size_vram"] == 0 and runner["gpu_layers"] == 0
